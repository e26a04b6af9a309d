"""End to end on a real Slurm cluster: `rdpt submit` runs real (tiny) training and prep jobs.

- a 2-process job completes and its MLflow run (created at submit) has the metrics;
- a 2-node job (one process per node namespace, gloo) reproduces the 1-node loss;
- USR1 to the batch script -> checkpoint -> requeue -> resume: the same final loss, same
  MLflow run, restart count logged;
- `--chain 2`: the second job continues the run after the first one stops on a signal;
- a prep job array of 3 tasks + finalize gives the same dataset as a local `rdpt prep`.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from fixtures_data import build_tiny_dataset, stdlib_subset
from fixtures_training import JOB_ARGS, JOB_STEPS, wait_for_step
from fixtures_training import step_losses as losses

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs/train/tiny.yaml")
STEPS = JOB_STEPS
TINY_ARGS = JOB_ARGS


def rdpt(cluster, cwd: Path, *argv: str) -> dict:
    """Run the real `rdpt` CLI (as a user would, in a subprocess) with --json; its JSON."""
    out = cluster.run(
        sys.executable, "-m", "pipeline.cli", *argv, "--json", cwd=cwd, check=False, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def submit_train(cluster, cwd: Path, dataset: Path, name: str, *args: str) -> tuple[Path, list]:
    res = rdpt(
        cluster,
        cwd,
        "submit",
        "train",
        TINY,
        "--gpus-per-node",
        "0",
        "--time",
        "10:00",
        f"data.path={dataset}",
        f"run.name={name}",
        *TINY_ARGS,
        *args,
    )
    return Path(res["run_dir"]), res["job_ids"], res


def logged_steps(log: str) -> list[int]:
    """Steps in the training log lines (`... step 7/12 loss ...`)."""
    return [int(m) for m in re.findall(rf"\bstep (\d+)/{STEPS}\b", log)]


def log_of(run_dir: Path, job: int) -> str:
    return (run_dir / "slurm" / f"slurm-{job}.out").read_text()


def kill_step_tasks(job: int) -> list[int]:
    """SIGKILL the processes of step 0 of `job` (our own test job's training ranks)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid"]):
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if (
            env.get("SLURM_JOB_ID") == str(job)
            and env.get("SLURM_STEP_ID") == "0"
            and "pipeline.cli" in " ".join(proc.cmdline())
        ):
            proc.kill()
            pids.append(proc.pid)
    return pids


def assert_completed(cluster, run_dir: Path, job: int, restarts: int = 0) -> dict:
    info = cluster.wait_finished(job, timeout=300)
    assert info["JobState"] == "COMPLETED", log_of(run_dir, job)[-3000:]
    assert int(info["Restarts"]) == restarts, log_of(run_dir, job)[-3000:]
    done = json.loads((run_dir / "COMPLETED").read_text())
    assert done["step"] == STEPS
    return info


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return tmp_path_factory.mktemp("project")


@pytest.fixture(scope="module")
def reference(slurm_cluster, project, tiny_dataset, mlflow_server):
    """The uninterrupted 2-process run on one node (tracked in MLflow)."""
    experiment = f"slurm-{uuid.uuid4().hex[:8]}"
    run_dir, (job,), res = submit_train(
        slurm_cluster,
        project,
        tiny_dataset,
        "reference",
        "--ntasks-per-node",
        "2",
        f"tracking.uri={mlflow_server.url}",
        f"tracking.experiment={experiment}",
    )
    info = assert_completed(slurm_cluster, run_dir, job)
    return {"run_dir": run_dir, "job": job, "info": info, "submit": res, "losses": losses(run_dir)}


@pytest.mark.slow
def test_two_process_job_completes_with_mlflow_metrics(reference, mlflow_server, project):
    from mlflow.tracking import MlflowClient

    run_dir, job = reference["run_dir"], reference["job"]
    assert sorted(reference["losses"]) == list(range(1, STEPS + 1))
    # the MLflow run was created by `rdpt submit` and continued by training
    run_id = reference["submit"]["mlflow"]["run_id"]
    assert run_id and json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run_id
    client = MlflowClient(mlflow_server.url)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    assert {m.step: m.value for m in history} == pytest.approx(reference["losses"])
    run = client.get_run(run_id)
    assert run.data.tags["slurm_job_id"] == str(job) and run.data.tags["world_size"] == "2"
    assert run.info.status == "FINISHED"
    log = log_of(run_dir, job)
    assert "(1 nodes x 2 tasks)" in log and "training step exited with 0" in log
    # the job ran the resolved config that submit wrote, and `rdpt jobs` knows the job
    cfg = yaml.safe_load((run_dir / "resolved.yaml").read_text())
    assert cfg["parallel"]["nproc"] == 2 and cfg["run"]["dir"] == str(run_dir)


def test_jobs_lists_the_submitted_job(slurm_cluster, reference, project):
    out = slurm_cluster.run(sys.executable, "-m", "pipeline.cli", "jobs", cwd=project)
    lines = out.stdout.splitlines()
    assert lines[0].split()[:5] == ["JOBID", "NAME", "STATE", "NODES", "ELAPSED"]
    row = next(line for line in lines if line.startswith(str(reference["job"]) + " "))
    assert "rdpt-reference" in row and "COMPLETED" in row and "runs/reference" in row
    assert reference["submit"]["mlflow"]["run_id"] in row


def test_two_node_job_matches_single_node_loss(
    slurm_cluster_2nodes, project, tiny_dataset, reference
):
    # NOTE: tracking off: the node namespaces cannot reach the MLflow server on 127.0.0.1.
    run_dir, (job,), _ = submit_train(
        slurm_cluster_2nodes,
        project,
        tiny_dataset,
        "twonode",
        "--nodes",
        "2",
        "--ntasks-per-node",
        "1",
        "tracking.enabled=false",
    )
    assert_completed(slurm_cluster_2nodes, run_dir, job)
    log = log_of(run_dir, job)
    assert "on n[1-2] (2 nodes x 1 tasks)" in log
    assert losses(run_dir) == pytest.approx(reference["losses"], rel=1e-6)


@pytest.mark.slow
def test_preemption_requeue_resumes_to_the_same_loss(
    slurm_cluster, project, tiny_dataset, reference, mlflow_server
):
    from mlflow.tracking import MlflowClient

    experiment = f"slurm-{uuid.uuid4().hex[:8]}"
    run_dir, (job,), res = submit_train(
        slurm_cluster,
        project,
        tiny_dataset,
        "preempt",
        "--ntasks-per-node",
        "2",
        "debug.sleep_per_step_s=0.3",
        f"tracking.uri={mlflow_server.url}",
        f"tracking.experiment={experiment}",
    )
    wait_for_step(run_dir, 2)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    assert_completed(slurm_cluster, run_dir, job, restarts=1)
    log = log_of(run_dir, job)
    assert "got SIGUSR1" in log and "training step exited with 85" in log and "requeueing" in log
    assert "restart 1 on n1" in log and log.count("training step exited with 0") == 1
    before, after = log.split("restart 1 on n1")
    assert 2 <= max(logged_steps(before)) < STEPS  # stopped part-way...
    assert min(logged_steps(after)) == max(logged_steps(before)) + 1  # ...resumed right there
    final = losses(run_dir)
    assert sorted(final) == list(range(1, STEPS + 1))
    assert final == pytest.approx(reference["losses"], rel=1e-6)
    assert final[STEPS] == reference["losses"][STEPS]
    # the same MLflow run continued, with the restart count
    run_id = res["mlflow"]["run_id"]
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run_id
    client = MlflowClient(mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].data.tags["slurm_restart_count"] == "1"
    history = client.get_metric_history(run_id, "train/loss")
    assert {m.step for m in history} == set(range(1, STEPS + 1))


@pytest.mark.slow
def test_chain_continues_after_a_kill_without_warning(
    slurm_cluster, project, tiny_dataset, reference
):
    """`--chain 2`, and job 1 is SIGKILLed (no warning, no checkpoint on the way out): job 2
    (afterany) resumes from the last periodic checkpoint and ends at the reference loss.
    (The USR1 hand-over between chain jobs is tested with the stand-in in test_slurm_jobscript.)
    """
    run_dir, jobs, _ = submit_train(
        slurm_cluster,
        project,
        tiny_dataset,
        "chained",
        "--ntasks-per-node",
        "2",
        "--chain",
        "2",
        "debug.sleep_per_step_s=0.3",
        "tracking.enabled=false",
    )
    assert len(jobs) == 2
    wait_for_step(run_dir, 6)  # past the periodic checkpoint of step 4
    # NOTE: `scancel --signal=KILL` would cancel the job (TERM first: a graceful checkpoint);
    # SIGKILL the training processes themselves, like the OOM killer or a crash would.
    killed = kill_step_tasks(jobs[0])
    assert len(killed) == 2
    first = slurm_cluster.wait_finished(jobs[0], timeout=120)
    assert first["JobState"] == "FAILED" and first["Restarts"] == "0", first
    assert "requeueing" not in log_of(run_dir, jobs[0])
    assert_completed(slurm_cluster, run_dir, jobs[1])
    first_steps = logged_steps(log_of(run_dir, jobs[0]))
    second_log = log_of(run_dir, jobs[1])
    assert "training step exited with 0" in second_log
    m = re.search(r"resumed from \S+step-(\d+) \(step (\d+)\)", second_log)
    resumed = int(m.group(2))
    assert resumed % 4 == 0 and 4 <= resumed <= max(first_steps) < STEPS  # a periodic one
    assert min(logged_steps(second_log)) == resumed + 1 and max(logged_steps(second_log)) == STEPS
    # steps after that checkpoint ran twice; the second time gives the same numbers again
    assert losses(run_dir) == pytest.approx(reference["losses"], rel=1e-6)
    assert losses(run_dir)[STEPS] == reference["losses"][STEPS]


PREP_FIELDS = dict(
    limit_bytes=400_000,
    tokenizer={"vocab_size": 512},
    seq_len=64,
    val_fraction=0.1,
    seqs_per_member=16,
    shard_size_mb=0.1,
    workers=1,
    chunk_mb=0.05,
)


def test_prep_array_matches_local_prep(slurm_cluster, project):
    local = build_tiny_dataset(project / "prep-local", **PREP_FIELDS)
    config = project / "prep.yaml"
    config.write_text(
        yaml.safe_dump({"inputs": stdlib_subset(), "output": "prep-array", **PREP_FIELDS})
    )
    res = rdpt(
        slurm_cluster, project, "submit", "prep", str(config), "--array", "3", "--time", "10:00"
    )
    array_job, final_job = res["job_ids"]
    final = slurm_cluster.wait_finished(final_job, timeout=300)
    assert final["JobState"] == "COMPLETED", final
    records = slurm_cluster.run("scontrol", "show", "job", "-o", str(array_job)).stdout
    tasks = {
        m.group(1): m.group(2) for m in re.finditer(r"ArrayTaskId=(\d+) .*?JobState=(\w+)", records)
    }
    assert tasks == {"0": "COMPLETED", "1": "COMPLETED", "2": "COMPLETED"}, records
    rows = [
        json.loads(line)
        for line in slurm_cluster.run(
            sys.executable, "-m", "pipeline.cli", "jobs", "--json", cwd=project
        ).stdout.splitlines()
    ]
    states = {r["id"]: (r["kind"], r["state"]) for r in rows}
    assert states[str(array_job)] == ("prep-array", "COMPLETED")
    assert states[str(final_job)] == ("prep-finalize", "COMPLETED")
    logs = sorted(Path(res["scripts"][0]).parent.glob(f"prep-{array_job}_*.out"))
    assert [f"prep task {i} of 3" in p.read_text() for i, p in enumerate(logs)] == [True] * 3
    out = project / "prep-array"
    assert (out / "manifest.json").read_bytes() == (local / "manifest.json").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    shards = [s["path"] for split in manifest["splits"].values() for s in split["shards"]]
    assert len(shards) >= 2
    for rel in shards:
        assert (out / rel).read_bytes() == (local / rel).read_bytes()
