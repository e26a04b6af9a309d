"""The rendered train.sbatch on a real cluster, driving a small stand-in for `rdpt train`.

The stand-in is a real Python process under srun that obeys the training contract: ranks from
pipeline.common.slurm_env, a "checkpoint" (its step) per rank, USR1/TERM -> save and exit 85,
COMPLETED in the run directory at the end, and an immediate exit 0 when already complete. It
lets these tests check the job script's signal forwarding, requeue, chain hand-over and
cancel paths in seconds; tests/test_submit_e2e.py repeats the important ones with real training.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launch.render import SbatchOptions
from launch.site import SiteConfig
from launch.submit import plan_train, submit_train
from pipeline.common.exitcodes import REQUEUE

STANDIN = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    from pipeline.common.slurm_env import apply_slurm_env

    run_dir, max_steps, step_s = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    fast_after_restart = float(sys.argv[4]) if len(sys.argv) > 4 else step_s
    apply_slurm_env()
    rank = int(os.environ["RANK"])
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    if restart:
        step_s = fast_after_restart
    stop = []
    signal.signal(signal.SIGUSR1, lambda s, f: stop.append("USR1"))
    signal.signal(signal.SIGTERM, lambda s, f: stop.append("TERM"))
    state = run_dir / f"state-{rank}.json"
    step = json.loads(state.read_text())["step"] if state.exists() else 0

    def event(kind, **kw):
        rec = {"event": kind, "step": step, "rank": rank, "job": os.environ["SLURM_JOB_ID"],
               "restart": restart, "world": os.environ["WORLD_SIZE"], "t": time.time(), **kw}
        with open(run_dir / f"events-{rank}.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\\n")

    if step >= max_steps:
        event("already-complete")
        sys.exit(0)
    event("start")
    while step < max_steps:
        if stop:
            tmp = state.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step}))
            os.replace(tmp, state)
            event("checkpoint", signal=stop[0])
            sys.exit(85)
        time.sleep(step_s)
        step += 1
        if step == 2:
            event("progress")  # tests signal a run that has made progress on this event
    state.write_text(json.dumps({"step": step}))
    event("done")
    if rank == 0:
        (run_dir / "COMPLETED").write_text(json.dumps({"step": step}))
    """
)

TRAIN_YAML = """\
run: {{name: {name}, dir: {run_dir}}}
data: {{path: {data}}}
model: {model}
train: {{max_steps: 10, global_batch_size: 2, micro_batch_size: 1}}
tracking: {{enabled: false}}
eval: {{interval: 0}}
"""
REPO = Path(__file__).resolve().parent.parent


def events(run_dir: Path, rank: int = 0, progress: bool = False) -> list[dict]:
    path = run_dir / f"events-{rank}.jsonl"
    if not path.exists():
        return []
    evs = [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in evs if progress or e["event"] != "progress"]


def wait_for_event(
    run_dir: Path, kind: str, timeout: float = 300, count: int = 1, ranks=(0, 1)
) -> None:
    """Until every rank in `ranks` wrote `count` events of `kind` (a hang guard, not a
    measurement). Every rank, not just rank 0: a signal sent while a rank is still starting
    (before its handlers are installed) would kill that rank instead of asking it to stop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = [sum(e["event"] == kind for e in events(run_dir, r, progress=True)) for r in ranks]
        if min(seen) >= count:
            return
        time.sleep(0.1)
    raise TimeoutError(
        f"no {kind!r} event from every rank {ranks} in {run_dir} after {timeout} s: "
        f"{[events(run_dir, r) for r in ranks]}"
    )


def submit_standin(
    tmp_path: Path,
    monkeypatch,
    dataset: Path,
    name: str,
    *,
    steps: int,
    step_s: float,
    fast_after_restart: float | None = None,
    chain: int = 1,
    time_limit: str = "10:00",
    signal_warn_s: int = 60,
    ntasks: int = 2,
):
    """Render train.sbatch with the stand-in as the command and submit it via submit_train."""
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / name
    standin = tmp_path / "standin.py"
    standin.write_text(STANDIN)
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        TRAIN_YAML.format(
            name=name, run_dir=run_dir, data=dataset, model=REPO / "configs/model/tiny.yaml"
        )
    )
    command = [sys.executable, str(standin), str(run_dir), str(steps), str(step_s)]
    if fast_after_restart is not None:
        command.append(str(fast_after_restart))
    opts = SbatchOptions(nodes=1, gpus_per_node=0, ntasks_per_node=ntasks, time=time_limit)
    plan = plan_train(
        str(config),
        [],
        opts,
        SiteConfig(),
        chain=chain,
        signal_warn_s=signal_warn_s,
        command=command,
    )
    result = submit_train(plan)
    return run_dir, result.job_ids


def job_log(run_dir: Path, job_id: int) -> str:
    path = run_dir / "slurm" / f"slurm-{job_id}.out"
    return path.read_text() if path.exists() else ""


def test_usr1_checkpoint_requeue_resume(slurm_cluster, tmp_path, monkeypatch, tiny_dataset):
    slurm_cluster.activate(monkeypatch)
    # NOTE: 400 steps of 0.1 s: the signal always lands mid-run, however loaded the machine
    # (the requeued run finishes the rest at once)
    run_dir, (job,) = submit_standin(
        tmp_path, monkeypatch, tiny_dataset, "usr1", steps=400, step_s=0.1, fast_after_restart=0.0
    )
    wait_for_event(run_dir, "progress")  # every rank a few steps in
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    info = slurm_cluster.wait_finished(job, timeout=300)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    for rank in (0, 1):
        ev = events(run_dir, rank)
        assert [e["event"] for e in ev] == ["start", "checkpoint", "start", "done"], ev
        assert ev[1]["signal"] == "USR1" and 0 < ev[1]["step"] < 400
        assert ev[2]["step"] == ev[1]["step"]  # resumed from the checkpoint, not from 0
        assert [e["restart"] for e in ev] == [0, 0, 1, 1] and ev[3]["step"] == 400
        assert {e["job"] for e in ev} == {str(job)} and {e["world"] for e in ev} == {"2"}
    assert "got SIGUSR1" in log and f"exited with {REQUEUE}" in log and "requeueing" in log
    assert "restart 0" in log and "restart 1" in log  # --open-mode=append kept both runs
    assert (run_dir / "COMPLETED").exists()


def test_chain_hands_over_then_stops(slurm_cluster, tmp_path, monkeypatch, tiny_dataset):
    slurm_cluster.activate(monkeypatch)
    run_dir, jobs = submit_standin(
        tmp_path,
        monkeypatch,
        tiny_dataset,
        "chain",
        steps=600,
        step_s=0.1,
        fast_after_restart=0.0,
        chain=3,
    )
    assert len(jobs) == 3
    second = slurm_cluster.job(jobs[1])
    assert second["JobState"] == "PENDING" and f"afterany:{jobs[0]}" in second["Dependency"]
    wait_for_event(run_dir, "start")
    listed = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "jobs", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout
    states = [(r["id"], r["state"]) for r in map(json.loads, listed.splitlines())]
    assert states == [
        (str(jobs[0]), "RUNNING"),
        (str(jobs[1]), "PENDING"),
        (str(jobs[2]), "PENDING"),
    ]
    table = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "jobs"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert "PENDING (Dependency)" in table and "runs/chain" in table
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(jobs[0]))
    first = slurm_cluster.wait_finished(jobs[0], timeout=300)
    # not the last job of the chain: it hands over instead of requeueing itself
    assert first["Restarts"] == "0" and first["ExitCode"] == f"{REQUEUE}:0"
    assert "next job of the chain" in job_log(run_dir, jobs[0])
    done = [slurm_cluster.wait_finished(j, timeout=300) for j in jobs[1:]]
    assert [d["JobState"] for d in done] == ["COMPLETED", "COMPLETED"]
    ev = events(run_dir)
    assert [e["event"] for e in ev] == ["start", "checkpoint", "start", "done"], ev
    assert [e["job"] for e in ev] == [str(jobs[0])] * 2 + [str(jobs[1])] * 2
    assert ev[2]["step"] == ev[1]["step"] > 0 and ev[3]["step"] == 600
    # the third job finds the run complete and stops without starting a step
    assert "already complete" in job_log(run_dir, jobs[2])


def test_cancel_stops_without_requeue(slurm_cluster, tmp_path, monkeypatch, tiny_dataset):
    slurm_cluster.activate(monkeypatch)
    run_dir, jobs = submit_standin(
        tmp_path, monkeypatch, tiny_dataset, "cancel", steps=600, step_s=0.1, chain=2
    )
    wait_for_event(run_dir, "start")
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "jobs", "cancel", str(jobs[0])],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"cancelled {jobs[0]}, {jobs[1]}"
    infos = [slurm_cluster.wait_finished(j, timeout=60) for j in jobs]
    assert [i["JobState"] for i in infos] == ["CANCELLED", "CANCELLED"]
    assert infos[0]["Restarts"] == "0"
    time.sleep(1)
    assert slurm_cluster.job(jobs[0])["JobState"] == "CANCELLED"  # still: it was not requeued
    # the TERM reached the step: it checkpointed before the job ended
    assert [e["event"] for e in events(run_dir)] == ["start", "checkpoint"]
    rows = [
        json.loads(line)
        for line in subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "jobs", "--json"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            check=True,
        ).stdout.splitlines()
    ]
    assert [(r["id"], r["state"]) for r in rows] == [
        (str(jobs[0]), "CANCELLED"),
        (str(jobs[1]), "CANCELLED"),
    ]
    assert {r["run_dir"] for r in rows} == {str(run_dir)}


@pytest.mark.slow
def test_real_time_limit_signal_requeues(slurm_cluster, tmp_path, monkeypatch, tiny_dataset):
    """--time=1 --signal=B:USR1@30: Slurm's own warning signal (30 s tick), not scancel."""
    slurm_cluster.activate(monkeypatch)
    run_dir, (job,) = submit_standin(
        tmp_path,
        monkeypatch,
        tiny_dataset,
        "limit",
        steps=2000,
        step_s=0.05,
        fast_after_restart=0.0,
        time_limit="1",
        signal_warn_s=30,
        ntasks=1,
    )
    info = slurm_cluster.wait_finished(job, timeout=150)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, log
    assert "got SIGUSR1" in log and "requeueing" in log and "TIME LIMIT" not in log, log
    ev = events(run_dir)
    assert ev[-1]["event"] == "done" and ev[-1]["step"] == 2000, ev
    # every checkpoint came from the warning (USR1), none from the limit's TERM
    assert all(e["signal"] == "USR1" for e in ev if e["event"] == "checkpoint"), ev
    # each start resumes from the previous checkpoint
    last = 0
    for e in ev:
        if e["event"] == "start":
            assert e["step"] == last, ev
        if e["event"] == "checkpoint":
            last = e["step"]
    # either the warning reached the running step, or it came with the first limit check,
    # before the step started or while it was starting (then the job requeued at once)
    early = "before the training step started" in log or "while starting up" in log
    assert last > 0 or early, log
