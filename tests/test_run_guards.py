"""Guards around a run directory: one run at a time (a lock file that names its holder and is
taken over only when its holder is gone), and continuing a run only with a config it can
continue exactly (the same check in `rdpt train` and `rdpt submit`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.common.exitcodes import REQUEUE

from distributed import run_distributed
from fixtures_training import REPO, training_env

TINY = str(REPO / "configs/train/tiny.yaml")


def _write_lock(run_dir: Path, **holder) -> Path:
    from pipeline.common.run_lock import LOCK_NAME

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps({"started": time.time(), "token": "x", **holder}))
    return path


def _lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_second_run_on_a_busy_run_dir_stops_naming_the_holder(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "train",
        TINY,
        f"data.path={tiny_dataset}",
        f"run.dir={run_dir}",
        # NOTE: far more steps than the test waits for: the first run must still hold the run
        # directory when the second one, however slowly it starts, looks at it; it is stopped
        # by a signal afterwards.
        "train.max_steps=1000",
        "train.global_batch_size=4",
        "train.log_interval=1",
        "eval.interval=0",
        "checkpoint.interval=1000",
        "tracking.enabled=false",
        "debug.sleep_per_step_s=0.2",
        "--nproc",
        "1",
    ]
    first = subprocess.Popen(
        args,
        cwd=REPO,
        env=training_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 600
    while not _lines(run_dir):  # the first run is training
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
        time.sleep(0.1)
    second = subprocess.run(args, cwd=REPO, env=training_env(), capture_output=True, text=True)
    assert second.returncode == 2, second.stderr
    assert f"is in use by another run: host {socket.gethostname()}, pid {first.pid}" in (
        second.stderr
    )
    assert first.poll() is None  # still training: the refusal above was about a live run
    first.send_signal(signal.SIGTERM)  # checkpoint and stop (exit 85)
    out, _ = first.communicate(timeout=600)
    assert first.returncode == REQUEUE, out
    steps = [rec["step"] for rec in _lines(run_dir) if "train/loss" in rec]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved or repeated lines
    assert not (run_dir / ".rdpt.lock").exists()  # released at the end


def test_stale_locks_are_taken_over_and_live_ones_refused(tmp_path, monkeypatch):
    from pipeline.common.run_lock import RdptRunLockError, RunLock

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    host = socket.gethostname()
    # a process of this host that is gone: taken over
    _write_lock(tmp_path / "a", host=host, pid=int(dead))
    lock = RunLock(tmp_path / "a")
    lock.acquire()
    assert json.loads((tmp_path / "a" / ".rdpt.lock").read_text())["pid"] == os.getpid()
    lock.release()
    # a live holder on another host, refreshed a moment ago: refused, named
    _write_lock(tmp_path / "b", host="gpu-node-17", pid=4242, slurm_job_id="777")
    with pytest.raises(RdptRunLockError, match="host gpu-node-17, pid 4242, Slurm job 777"):
        RunLock(tmp_path / "b").acquire()
    # ... unless it has not been refreshed for longer than stale_after_s (a crashed node)
    old = time.time() - 3600
    os.utime(tmp_path / "b" / ".rdpt.lock", (old, old))
    RunLock(tmp_path / "b", stale_after_s=600).acquire()
    # an earlier run of this very Slurm job (requeued): taken over
    _write_lock(tmp_path / "c", host="gpu-node-17", pid=4242, slurm_job_id="888")
    monkeypatch.setenv("SLURM_JOB_ID", "888")
    RunLock(tmp_path / "c").acquire()


def _hold(rank, world, run_dir):
    from pipeline.common.run_lock import RdptRunLockError
    from pipeline.training.rank import hold_run_dir

    try:
        hold_run_dir(Path(run_dir), rank)
    except RdptRunLockError as e:
        return str(e)
    return None


def test_every_rank_of_a_job_stops_when_the_run_dir_is_busy(tmp_path):
    """Under srun the lock is taken by rank 0 inside training: all ranks learn the outcome."""
    _write_lock(tmp_path / "run", host=socket.gethostname(), pid=os.getpid())  # alive: this one
    errors = run_distributed(_hold, 2, args=(str(tmp_path / "run"),))
    assert all(e and f"pid {os.getpid()}" in e for e in errors), errors


def test_continuing_with_another_global_batch_is_refused_or_exact(tiny_trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_trained_run, run_dir)
    (run_dir / "COMPLETED").unlink()
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "train",
        str(run_dir / "resolved.yaml"),
        f"run.dir={run_dir}",
        "train.max_steps=62",
        "train.global_batch_size=32",
        "tracking.enabled=false",
        "--nproc",
        "2",
    ]
    refused = subprocess.run(cmd, cwd=REPO, env=training_env(), capture_output=True, text=True)
    assert refused.returncode == 2, refused.stderr
    assert "train.global_batch_size: 16 -> 32" in refused.stderr
    assert "--allow-change train.global_batch_size" in refused.stderr
    assert not any((run_dir / "checkpoints").glob("step-0000006[12]"))  # nothing ran

    accepted = subprocess.run(
        [*cmd, "--allow-change", "train.global_batch_size"],
        cwd=REPO,
        env=training_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    ids = {}
    for path in (run_dir / "logs").glob("samples-rank*.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            ids.setdefault(rec["step"], set()).update(rec["ids"])
    seen = set().union(*(ids[s] for s in range(60)))
    after = ids[60] | ids[61]
    assert len(ids[60]) == len(ids[61]) == 32  # the new batch size
    assert not seen & after  # continues with unseen sequences: nothing repeated...
    assert _next_in_order(run_dir, 60 * 16, 64) == after  # ...exactly the next ones in order


def _next_in_order(run_dir: Path, position: int, n: int) -> set[int]:
    """The sequence ids at [position, position + n) of the run's first epoch order."""
    from pipeline.data.loader import EpochOrder, SplitReader, open_dataset
    from pipeline.training.config import load_train_config

    cfg = load_train_config(run_dir / "resolved.yaml")
    reader = SplitReader(open_dataset(cfg.data.path), "train")
    assert position + n <= reader.num_sequences  # still the first epoch
    order = EpochOrder(reader, cfg.run.seed, 0, cfg.data.shuffle)
    return {int(i) for i in order.ids(position, position + n)}
