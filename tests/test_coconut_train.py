"""`train.stage: coconut` under DeepSpeed: stages switch with the data epoch, and a run stopped
mid-stage resumes exactly (the same losses as the uninterrupted run)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.task_prep import TaskPrepConfig, prepare_task
from pipeline.training.config import TrainConfig
from pipeline.training.config_change import check_continuation

from fixtures_training import REPO, training_env

STEPS = 14  # 8 steps per epoch: stage 0 = steps 0-7, stage 1 = steps 8-15


@pytest.fixture(scope="module")
def small_task(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("coconut") / "arith"
    prepare_task(
        TaskPrepConfig(
            task="arithmetic",
            output=str(out),
            sizes={"train": 64, "val": 8, "test": 8},
            arithmetic={"steps": [1, 3]},
            seqs_per_member=8,
        )
    )
    return out


def _train(data: Path, run_dir: Path, *extra: str) -> str:
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "train",
        str(REPO / "configs/train/task-tiny.yaml"),
        f"data.path={data}",
        f"run.dir={run_dir}",
        "tracking.enabled=false",
        "train.stage=coconut",
        "coconut.max_stages=2",
        "coconut.thoughts_per_step=2",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.log_interval=1",
        "optim.warmup_steps=2",
        "checkpoint.interval=100",
        "debug.record_sample_ids=true",
        *extra,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=training_env(), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            out[rec["step"]] = rec["train/loss"]
    return out


def _cut_back_to(run_dir: Path, step: int) -> None:
    """The run as a kill -9 right after checkpoint `step` leaves it: later checkpoints,
    COMPLETED and later metric lines gone, `latest` at `step`."""
    ckpts = run_dir / "checkpoints"
    for d in ckpts.glob("step-*"):
        if int(d.name.split("-")[1]) > step:
            shutil.rmtree(d)
    (ckpts / "latest").write_text(f"step-{step:08d}\n")
    (run_dir / "COMPLETED").unlink()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    (run_dir / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))


@pytest.fixture(scope="module")
def full_run(small_task, tmp_path_factory) -> tuple[Path, str]:
    """The uninterrupted 2-rank ZeRO-2 coconut run (run dir, console output)."""
    full = tmp_path_factory.mktemp("coconut-full") / "full"
    log = _train(
        small_task, full, f"train.max_steps={STEPS}", "checkpoint.interval=10", "--nproc", "2"
    )
    return full, log


def test_coconut_switches_stages_and_resumes_mid_stage_exactly(small_task, full_run, tmp_path):
    full, log = full_run
    assert "coconut: stage 0 at step 0" in log and "coconut: stage 1 at step 8" in log
    before = _losses(full)

    part = tmp_path / "part"
    shutil.copytree(full, part)
    _cut_back_to(part, 10)  # stopped inside stage 1 (steps 8-15)
    log = _train(
        small_task, part, f"train.max_steps={STEPS}", "checkpoint.interval=10", "--nproc", "2"
    )
    assert "coconut: stage 1 at step 10" in log  # the resumed run knows its stage
    after = _losses(part)
    assert sorted(after) == sorted(before) == list(range(1, STEPS + 1))
    assert [after[s] for s in range(11, STEPS + 1)] == [before[s] for s in range(11, STEPS + 1)]


def test_coconut_runs_under_zero_0_and_1_like_zero_2(small_task, full_run, tmp_path):
    # ZeRO-2: the first two steps of the full run (inside the 2-step warm-up, so the learning
    # rates do not depend on train.max_steps)
    losses = {2: _losses(full_run[0])}
    for zero in (0, 1):
        run = tmp_path / f"z{zero}"
        _train(small_task, run, "train.max_steps=2", f"parallel.zero_stage={zero}", "--nproc", "2")
        losses[zero] = _losses(run)
    for zero in (0, 1):
        for step in (1, 2):
            assert losses[zero][step] == pytest.approx(losses[2][step], rel=1e-5)


def test_a_run_from_before_coconut_existed_continues():
    new = TrainConfig().model_dump(mode="json")
    old = json.loads(json.dumps(new))
    del old["coconut"], old["data"]["pause"], old["data"]["reasoning_steps"]
    assert check_continuation(old, new) == []
    new["coconut"]["max_stages"] = 5
    assert any("coconut.max_stages" in p for p in check_continuation(old, new))
