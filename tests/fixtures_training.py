"""Training fixtures shared by every area's tests (registered in conftest.py).

`tiny_trained_run`: the Path of the run directory of a real, short `rdpt train` run (2
processes, DeepSpeed ZeRO-2, fp32 on CPU) of configs/train/tiny.yaml on `tiny_dataset`, logged
to the session MLflow server. It holds resolved.yaml, metrics.jsonl, logs/ (incl. the sample ids
each rank trained on, per step), checkpoints/step-00000030 and step-00000060 (latest), COMPLETED
and mlflow_run.json. Validation at the end shows val/loss_r8 < val/loss_r1. Built once per
session in about 30-40 s; treat it as read-only (copy it to modify it).

`tiny_run_command(data, run_dir, uri, *extra)`: the exact command line of that run, so tests
can repeat it (interrupted, resumed, ...) and compare with the fixture.

`JOB_STEPS`, `JOB_ARGS`: the short run the Slurm tests submit (12 steps, a checkpoint every 4).
`step_losses(run_dir)`: step -> train/loss of a run; `wait_for_step(run_dir, step)`: wait
until a (background) run logged that step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_RUN_STEPS = 60
TINY_RUN_EXPERIMENT = "rdpt-tests-tiny-run"
JOB_STEPS = 12
JOB_ARGS = [
    f"train.max_steps={JOB_STEPS}",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "checkpoint.interval=4",
    "eval.interval=0",
    "train.log_interval=1",
]


def rdpt_train_command(data: Path, run_dir: Path, *args: str) -> list[str]:
    """`rdpt train configs/train/tiny.yaml` on `data` into `run_dir`, then `args` (overrides
    and flags)."""
    config = str(REPO / "configs/train/tiny.yaml")
    return [sys.executable, "-m", "pipeline", "train", config, f"data.path={data}",
            f"run.dir={run_dir}", *args]  # fmt: skip


def tiny_run_command(data: Path, run_dir: Path, uri: str | None, *extra: str) -> list[str]:
    """`rdpt train` of the tiny run (extra overrides/flags appended last, so they win)."""
    cmd = rdpt_train_command(
        data,
        run_dir,
        f"run.name={run_dir.name}",
        f"train.max_steps={TINY_RUN_STEPS}",
        "train.log_interval=1",
        "optim.warmup_steps=10",
        "checkpoint.interval=30",
        "checkpoint.keep_last=3",
        "eval.interval=30",
        "eval.recurrences=[1,4,8]",
        "eval.max_sequences=32",
        "debug.record_sample_ids=true",
        f"tracking.experiment={TINY_RUN_EXPERIMENT}",
        "--nproc",
        "2",
    )
    if uri:
        cmd.insert(-2, f"tracking.uri={uri}")
    else:
        cmd.insert(-2, "tracking.enabled=false")
    return cmd + list(extra)


def training_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


@pytest.fixture(scope="session")
def tiny_trained_run(tiny_dataset, mlflow_server, tmp_path_factory) -> Path:
    """Run dir of a finished 2-process tiny training run (see the module docstring)."""
    run_dir = tmp_path_factory.mktemp("train") / "tiny-run"
    cmd = tiny_run_command(tiny_dataset, run_dir, mlflow_server.url)
    proc = subprocess.run(
        cmd, cwd=REPO, env=training_env(), capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0 or not (run_dir / "COMPLETED").is_file():
        raise RuntimeError(
            f"tiny training run failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return run_dir


def step_losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss from metrics.jsonl; the last line of a step wins (a resumed run
    repeats the steps after its checkpoint)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            out[rec["step"]] = rec["train/loss"]
    return out


def wait_for_step(run_dir: Path, step: int, timeout: float = 300, log: Path | None = None):
    """Wait until training logged `step` (its loop runs: signal handlers are installed). The
    timeout is a hang guard only; `log` (a job's output) is quoted when it fires."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(step_losses(run_dir), default=0) >= step:
            return
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise TimeoutError(f"{run_dir}: step {step} not reached in {timeout} s\n{tail}")
