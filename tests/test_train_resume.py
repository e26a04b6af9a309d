"""Interrupted `rdpt train` runs (2 processes, ZeRO-2) resume exactly.

The same run as the `tiny_trained_run` fixture is stopped by SIGUSR1 (exit 85 after a
checkpoint), restarted, killed with kill -9 (launcher and workers), restarted with
`--resume auto` and finished: the loss curve equals the uninterrupted run's, and every step
trained on the same samples, each sample once. The MLflow run is the same across all three
processes. Then the MLflow checks on the fixture's run (params, tags, metrics, artifacts)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from fixtures_training import REPO, TINY_RUN_STEPS, tiny_run_command, training_env


def _records(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl folded per step, later lines winning (re-done steps after a crash)."""
    out: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out.setdefault(rec["step"], {}).update(rec)
    return out


def _samples(run_dir: Path) -> dict[int, list[int]]:
    """{step: sorted sample ids of the global batch} (last record per step and rank)."""
    per_rank: dict[tuple[int, int], list[int]] = {}
    for path in sorted((run_dir / "logs").glob("samples-rank*.jsonl")):
        rank = int(path.stem.removeprefix("samples-rank"))
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            per_rank[(rec["step"], rank)] = rec["ids"]
    steps: dict[int, list[int]] = {}
    for (step, _), ids in per_rank.items():
        steps.setdefault(step, []).extend(ids)
    return {s: sorted(ids) for s, ids in steps.items()}


def _wait_for(pred, proc, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _start(cmd, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=training_env(),
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_sigusr1_and_kill9_then_resume_match_uninterrupted_run(
    tiny_trained_run, tiny_dataset, mlflow_server, tmp_path
):
    run_dir = tmp_path / "interrupted"
    run_dir.mkdir()
    cmd = tiny_run_command(tiny_dataset, run_dir, mlflow_server.url)
    console = run_dir / "console.log"

    # 1. SIGUSR1 mid-run: the step finishes, all ranks checkpoint, exit 85 (requeue)
    proc = _start(cmd, console)
    _wait_for(lambda: max(_records(run_dir), default=0) >= 8, proc, 300, "step 8")
    os.kill(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=120) == 85, console.read_text()[-3000:]
    stopped_at = int((run_dir / "checkpoints/latest").read_text().strip().split("-")[1])
    assert stopped_at >= 8
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]

    # 2. resume, then kill -9 the launcher and every worker after the step-30 checkpoint
    proc = _start(cmd, console)
    _wait_for(lambda: max(_records(run_dir), default=0) >= 33, proc, 300, "step 33")
    victims = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert len(victims) >= 3  # launcher + 2 workers
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    psutil.wait_procs([p for p in map(_proc_or_none, victims) if p], timeout=30)
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step-00000030"

    # 3. --resume auto finishes the run
    proc = _start(cmd + ["--resume", "auto"], console)
    assert proc.wait(timeout=300) == 0, console.read_text()[-3000:]
    assert json.loads((run_dir / "COMPLETED").read_text())["step"] == TINY_RUN_STEPS
    assert "resumed from" in (run_dir / "logs/train.log").read_text()

    # identical loss curve and validation losses
    ref, got = _records(tiny_trained_run), _records(run_dir)
    assert sorted(s for s in got if "train/loss" in got[s]) == list(range(1, TINY_RUN_STEPS + 1))
    for step, rec in ref.items():
        for key in ("train/loss", "train/grad_norm", "train/r", "val/loss_r1", "val/loss_r8"):
            if key in rec:
                assert got[step][key] == pytest.approx(rec[key], abs=1e-6), (step, key)
    # the same samples at every step, each sample exactly once
    ref_samples, got_samples = _samples(tiny_trained_run), _samples(run_dir)
    assert got_samples == ref_samples
    assert sorted(got_samples) == list(range(TINY_RUN_STEPS))
    every = [i for ids in got_samples.values() for i in ids]
    assert len(every) == len(set(every)) == TINY_RUN_STEPS * 16
    # one MLflow run across the three processes
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run_id

    # a finished run exits 0 at once
    again = subprocess.run(
        cmd, cwd=REPO, env=training_env(), capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0 and "already complete" in again.stdout


def _proc_or_none(pid):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def test_mlflow_run_has_params_tags_metrics_and_artifacts(tiny_trained_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    info = json.loads((tiny_trained_run / "mlflow_run.json").read_text())
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(info["run_id"])
    params, tags = run.data.params, run.data.tags
    assert params["optim.lr"] == "0.003" and params["parallel.zero_stage"] == "2"
    assert params["train.max_steps"] == str(TINY_RUN_STEPS) and params["model.hidden_size"]
    assert tags["world_size"] == "2" and tags["dp"] == "2" and tags["tp"] == "1"
    assert tags["zero_stage"] == "2" and tags["hostname"] and len(tags["git_commit"]) >= 7
    assert tags["dataset.manifest_sha256"] and run.info.status == "FINISHED"
    assert tags["checkpoint.latest.step"] == str(TINY_RUN_STEPS)
    history = client.get_metric_history(info["run_id"], "train/loss")
    assert sorted(m.step for m in history) == list(range(1, TINY_RUN_STEPS + 1))
    for name in (
        "train/lr",
        "train/grad_norm",
        "train/tokens",
        "train/tokens_per_s",
        "train/r",
        "train/r_no_grad",
        "train/r_grad",
        "train/skipped_steps",
        "val/loss_r1",
        "val/loss_r4",
        "val/loss_r8",
        "val/state_cosine",
    ):
        assert client.get_metric_history(info["run_id"], name), name
    final = run.data.metrics  # latest value of each metric
    assert final["val/loss_r8"] < final["val/loss_r1"]  # recurrence helps after training
    top = {a.path for a in client.list_artifacts(info["run_id"])}
    assert {"resolved.yaml", "dataset", "checkpoints"} <= top, top
    assert "dataset/manifest.json" in {
        a.path for a in client.list_artifacts(info["run_id"], "dataset")
    }
    refs = {a.path for a in client.list_artifacts(info["run_id"], "checkpoints")}
    assert "checkpoints/step-00000060.json" in refs, refs
