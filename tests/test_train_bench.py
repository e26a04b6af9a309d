"""bench/train.py on CPU: the full stack (DeepSpeed engine, loader, logging) and a bare
forward/backward of the same model are timed side by side, and the model FLOPs and MFU it
reports are those of a count by hand from the model's shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flops_by_hand import hand_flops_from_model_yaml

REPO = Path(__file__).resolve().parents[1]


def run_bench(tmp_path, result_glob: str, *args: str) -> dict:
    """bench/train.py ARGS, one thread; the JSON record it wrote (matching `result_glob`)."""
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = tmp_path.glob(result_glob)
    return json.loads(result.read_text())


def test_train_bench_reports_hand_counted_flops_and_mfu_side_by_side(tiny_dataset, tmp_path):
    peak_tflops = 0.5
    record = run_bench(
        tmp_path,
        "train-cpu-*.json",
        "--data",
        str(tiny_dataset),
        "--r",
        "5",
        "--k",
        "2",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--peak-tflops",
        str(peak_tflops),
        "--out",
        str(tmp_path),
    )
    manifest = json.loads((Path(tiny_dataset) / "manifest.json").read_text())
    assert (record["r"], record["k"], record["seq_len"]) == (5, 2, manifest["seq_len"])
    full, bare = record["full_stack"], record["bare"]
    tokens = record["micro_batch"] * record["seq_len"]
    for timing in (full, bare):  # both measured: time per step and tokens/s agree
        assert timing["step_s"] > 0
        assert timing["tokens_per_s"] == pytest.approx(tokens / timing["step_s"], rel=1e-9)
    hand = hand_flops_from_model_yaml(
        REPO / "configs/model/tiny.yaml",
        seq=record["seq_len"],
        r=5,
        k=2,
        vocab=manifest["vocab_size"],
    )
    # full stack: the FLOPs of the 3 measured steps over their total time
    assert full["model_flops"] == hand * tokens * 3
    assert record["model_tflops_full"] * 1e12 == pytest.approx(
        hand * tokens * 3 / full["total_s"], rel=1e-9
    )
    assert record["model_tflops_bare"] * 1e12 * bare["step_s"] == pytest.approx(
        hand * tokens, rel=1e-9
    )
    assert record["peak_tflops"] == peak_tflops
    assert record["mfu_full"] == pytest.approx(
        hand * tokens * 3 / full["total_s"] / (peak_tflops * 1e12), rel=1e-9
    )
    assert record["mfu_bare"] == pytest.approx(
        hand * tokens / bare["step_s"] / (peak_tflops * 1e12), rel=1e-9
    )


def test_train_bench_synthetic_sampled_r_counts_each_steps_flops(tmp_path):
    record = run_bench(
        tmp_path,
        "train-cpu-z1-*.json",
        "--synthetic",
        "--seq-len",
        "32",
        "--micro-batch",
        "2",
        "--r",
        "4",
        "--k",
        "2",
        "--sampled-r",
        "--zero",
        "1",
        "--steps",
        "4",
        "--warmup",
        "1",
        "--profile",
        "--out",
        str(tmp_path),
    )
    assert record["synthetic"] and record["seq_len"] == 32 and record["zero_stage"] == 1
    measured = record["r_drawn"][1:5]  # after the warm-up step
    assert len(set(record["r_drawn"])) > 1  # r really varied
    tiny = REPO / "configs/model/tiny.yaml"
    hand = sum(hand_flops_from_model_yaml(tiny, seq=32, r=r, k=2) * 2 * 32 for r in measured)
    assert record["full_stack"]["model_flops"] == hand
    assert len(record["top_kernels"]) == 20 and all(k["time_us"] > 0 for k in record["top_kernels"])
