"""bench/model.py runs its CPU smoke shape through the same code path as on GPU and writes
a JSON record with tokens/s and TFLOP/s."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from flops_by_hand import hand_flops_from_model_yaml
from test_model_reference import tp1  # noqa: F401

TINY = Path(__file__).resolve().parents[1] / "configs/model/tiny.yaml"


def load_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "model.py"
    spec = importlib.util.spec_from_file_location("bench_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_smoke_writes_results(tp1, tmp_path):
    bench = load_bench()
    argv = ["--smoke", "--out", str(tmp_path), "--iters", "1", "--peak-tflops", "2"]
    assert bench.main(argv) == 0
    (out,) = tmp_path.glob("model-*.json")
    record = json.loads(out.read_text())
    rows = record["results"]
    assert {r["backend"] for r in rows} == {"math", "sdpa"}
    for r in rows:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0
        assert r["r"] == 4 and r["k"] == 2
        # the FLOPs and MFU it reports are a count by hand of the tiny shape (seq 64, batch 2)
        hand = hand_flops_from_model_yaml(TINY, seq=64, r=4, k=2) * 2 * 64
        assert r["tflops"] * 1e12 * r["step_s"] == pytest.approx(hand, rel=1e-9)
        assert r["mfu"] == pytest.approx(hand / r["step_s"] / 2e12, rel=1e-9)
        assert r["compiled_graphs"] == 0 and r["recompiles_after_warmup"] == 0  # eager
