"""bench/gpu.sh, the one command for a GPU machine, checked on CPU: it parses (bash -n), every
step runs under its own timeout and the limits add up to at most 9 minutes, and its dry run
runs each step's own --dry-run / --help (attention, model, train, loss benches; the GPU tests
are collected)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu.sh"


def test_gpu_script_parses():
    for script in (SCRIPT, REPO / "bench" / "gpu_wheels.sh"):
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def test_gpu_script_runs_every_file_that_holds_gpu_tests():
    listed = re.search(r"GPU_TESTS=\(([^)]*)\)", SCRIPT.read_text()).group(1).split()
    marked = sorted(
        f"tests/{p.name}"
        for p in (REPO / "tests").glob("test_*.py")
        if re.search(r"pytest\.mark\.gpu\b|\bmark\.gpu\b", p.read_text())
    )
    assert sorted(listed) == marked


@pytest.mark.slow  # runs each bench's dry run and collects the GPU test files
def test_gpu_script_dry_run_lists_every_step_under_a_timeout(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    steps = re.findall(r"^=== (\S+) \(timeout (\d+)s\)", out.stdout, re.M)
    names = [n for n, _ in steps]
    assert names == [
        "install",
        "versions",
        "pytest",
        "attention",
        "model",
        "train-z1",
        "train-z2",
        "train-z3",
        "loss",
    ]
    assert sum(int(s) for _, s in steps) <= 9 * 60
    assert "dry run: every step's command is valid" in out.stdout
    assert "TORCH_LOGS=recompiles" in out.stdout and "--profile" in out.stdout


def test_gpu_script_without_an_output_folder_is_a_usage_error():
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 2 and "bench/gpu.sh OUT_DIR" in out.stderr
