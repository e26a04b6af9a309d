"""bench/train.py on CPU: the full stack (DeepSpeed engine, loader, logging) and a bare
forward/backward of the same model are timed side by side and written as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_train_bench_smoke_writes_side_by_side_figures(tiny_dataset, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "train.py"),
            "--data",
            str(tiny_dataset),
            "--steps",
            "3",
            "--warmup",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = tmp_path.glob("train-cpu-*.json")
    record = json.loads(result.read_text())
    full, bare = record["full_stack"], record["bare"]
    assert full["step_s"] > 0 and bare["step_s"] > 0
    assert full["tokens_per_s"] > 0 and bare["tokens_per_s"] > 0
    expected = 100 * (full["step_s"] / bare["step_s"] - 1)
    assert abs(record["overhead_pct"] - expected) < 1e-6
