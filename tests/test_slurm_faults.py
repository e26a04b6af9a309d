"""Real training under the faults a cluster inflicts without asking: preemption by a
higher-priority job, and a node that dies mid-job.

Both tests run real `rdpt submit train` jobs (tiny model, 2 ranks, one per node) on their own
2-node cluster, configured as a preemptible site would be:
- partitions `low` (PriorityTier 1, PreemptMode=REQUEUE, GraceTime 120 s) and `high`
  (PriorityTier 10): a `high` job that needs the nodes preempts `low` jobs. Slurm sends the
  victim SIGTERM (no USR1: that is only for the time limit), waits up to GraceTime for it to
  end, then requeues it;
- SlurmdTimeout=6: a node that stops answering is declared DOWN within seconds (the default is
  300 s), its jobs end NODE_FAIL and, being --requeue jobs, go back to the queue.
Both must end at exactly the loss of an uninterrupted run, with the steps after the resumed
checkpoint trained again from the same state and data.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_slurm import start_cluster
from fixtures_training import JOB_ARGS, JOB_STEPS, training_env, wait_for_step
from fixtures_training import step_losses as losses

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs/train/tiny.yaml")
STEPS = JOB_STEPS
ARGS = [*JOB_ARGS, "tracking.enabled=false"]  # the node namespaces cannot reach 127.0.0.1
GRACE_S = 120
PREEMPTION_CONF = "\n".join(
    [
        "PreemptType=preempt/partition_prio",
        "PreemptMode=REQUEUE",
        "SlurmdTimeout=6",
    ]
)
PARTITIONS = "\n".join(
    [
        f"PartitionName=low Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=1 "
        f"PreemptMode=REQUEUE GraceTime={GRACE_S}",
        "PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF",
    ]
)


@pytest.fixture(scope="module")
def cluster():
    with start_cluster(nodes=2, extra_conf=PREEMPTION_CONF, extra_partitions=PARTITIONS) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory) -> dict[int, float]:
    """Losses of the uninterrupted run: the same config, 2 local processes."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    cmd = [sys.executable, "-m", "pipeline.cli", "train", TINY, f"data.path={tiny_dataset}"]
    cmd += [f"run.dir={run_dir}", *ARGS, "--nproc", "2"]
    out = subprocess.run(cmd, cwd=REPO, env=training_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return losses(run_dir)


def logged_steps(log: str) -> list[int]:
    return [int(m) for m in re.findall(rf"\bstep (\d+)/{STEPS}\b", log)]


def submit(cluster, cwd: Path, dataset: Path, name: str, *args: str) -> tuple[Path, int]:
    out = cluster.run(
        sys.executable, "-m", "pipeline.cli", "submit", "train", TINY, "--gpus-per-node", "0",
        "--nodes", "2", "--ntasks-per-node", "1", "--time", "10:00", "--json",
        f"data.path={dataset}", f"run.name={name}", *ARGS, *args,
        cwd=cwd, check=False, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    (job,) = res["job_ids"]
    return Path(res["run_dir"]), job


def job_log(run_dir: Path, job: int) -> Path:
    return run_dir / "slurm" / f"slurm-{job}.out"


def test_preempted_by_a_higher_priority_job_checkpoints_requeues_and_resumes_exactly(
    cluster, tmp_path, tiny_dataset, reference
):
    run_dir, job = submit(
        cluster, tmp_path, tiny_dataset, "preempted", "--partition", "low",
        "debug.sleep_per_step_s=0.3",
    )  # fmt: skip
    log_path = job_log(run_dir, job)
    wait_for_step(run_dir, 2, log=log_path)
    # the preemptor needs both nodes whole: the training job must give them up
    urgent = cluster.sbatch(["-p", "high", "-N", "2", "--exclusive", "--wrap", "sleep 2"])
    info = cluster.wait_finished(job, timeout=600)
    log = log_path.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    assert cluster.wait_finished(urgent)["JobState"] == "COMPLETED"
    # Slurm cancels the step with SIGTERM; every rank checkpoints within the grace time and
    # exits 85 (not SIGKILLed at its end)
    first, second = log.split("restart 1 on")
    assert "CANCELLED" in first and "training step exited with 85" in first, log
    assert first.count("stop signal received (SIGTERM)") == 2, first
    stopped = max(logged_steps(first))
    assert 2 <= stopped < STEPS
    m = re.search(r"resumed from \S+step-(\d+) \(step (\d+)\)", second)
    assert m and int(m.group(2)) == stopped, second[-3000:]  # the preemption checkpoint itself
    assert min(logged_steps(second)) == stopped + 1 and "training step exited with 0" in second
    # the urgent job ran in the gap: after training let go of the nodes, before it came back
    urgent_info = cluster.job(urgent)
    gave_up = re.search(r"training step exited with 85 at (\S+)Z", first).group(1)
    came_back = re.search(r"^ (\S+) \(.*? at (\S+)Z", second).group(2)
    assert gave_up <= urgent_info["StartTime"] <= urgent_info["EndTime"] <= came_back, (
        gave_up, urgent_info, came_back,
    )  # fmt: skip
    final = losses(run_dir)
    assert sorted(final) == list(range(1, STEPS + 1))
    assert final == pytest.approx(reference, rel=1e-6)
    assert final[STEPS] == pytest.approx(reference[STEPS], rel=1e-6)


def test_a_node_dying_mid_job_ends_in_a_requeue_and_an_exact_resume(
    cluster, tmp_path, tiny_dataset, reference
):
    run_dir, job = submit(
        cluster, tmp_path, tiny_dataset, "node-death", "debug.sleep_per_step_s=0.3"
    )
    log_path = job_log(run_dir, job)
    wait_for_step(run_dir, 6, log=log_path)  # past the periodic checkpoint of step 4
    killed = cluster.power_off("n2")  # rank 1's node: cable pulled, everything on it killed
    assert len(killed) >= 3  # slurmd, the step's slurmstepd, the training rank (at least)
    # Slurm notices the silent node, fails the job with NODE_FAIL and requeues it; it can run
    # again only when both nodes are back
    cluster.wait_state(job, {"PENDING", "REQUEUED", "REQUEUE_FED"}, timeout=120)
    cluster.power_on("n2")
    info = cluster.wait_finished(job, timeout=600)
    log = log_path.read_text()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, log[-4000:]
    states = [r["State"] for r in cluster.sacct(job)]
    assert states[0] == "NODE_FAIL" and states[-1] == "COMPLETED", states
    first, second = log.split("restart 1 on", 1)
    reached = max(logged_steps(first))
    m = re.search(r"resumed from \S+step-(\d+) \(step (\d+)\)", second)
    resumed = int(m.group(2)) if m else None
    # no warning, so no checkpoint on the way out: a periodic one, at most where the run was
    assert resumed is not None and resumed % 4 == 0 and 4 <= resumed <= reached, second[-3000:]
    assert min(logged_steps(second)) == resumed + 1 and max(logged_steps(second)) == STEPS
    final = losses(run_dir)
    assert sorted(final) == list(range(1, STEPS + 1))
    assert final == pytest.approx(reference, rel=1e-6)
