"""Bad input caught before sbatch, checked against a real cluster (sinfo/scontrol)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs/train/tiny.yaml")

BAD = [
    (["--partition", "nope"], "unknown partition 'nope'"),
    (["--partition", "restricted"], "partition 'restricted' needs --account"),
    (
        ["--partition", "restricted", "--account", "gamma"],
        "account 'gamma' may not use partition 'restricted' (AllowAccounts=alpha,beta)",
    ),
    (
        ["--gpus-per-node", "2", "train.micro_batch_size=8"],
        "nodes of partition 'debug' have 0 GPU(s)",
    ),
    (["--nodes", "2"], "partition 'debug' has only 1 node(s)"),
]


@pytest.fixture
def project(tmp_path, monkeypatch, slurm_cluster):
    slurm_cluster.activate(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RDPT_SITE_CONFIG", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def submit(capsys, *argv):
    rc = main(["submit", "train", TINY, *argv])
    return (rc, *capsys.readouterr())


def queue(cluster) -> str:
    return cluster.run("squeue", "-h", "-o", "%i %j").stdout.strip()


@pytest.mark.parametrize("args,message", BAD, ids=[m.split(" (")[0] for _, m in BAD])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "submit"])
def test_cluster_rejects_bad_input(
    project, capsys, slurm_cluster, tiny_dataset, args, message, dry_run
):
    before = queue(slurm_cluster)
    extra = ["--dry-run"] if dry_run else []
    rc, out, err = submit(
        capsys, *args, *extra, f"data.path={tiny_dataset}", "run.name=bad", "tracking.enabled=false"
    )
    assert rc == 2 and message in err, (out, err)
    assert queue(slurm_cluster) == before  # nothing submitted
    assert not (project / ".rdpt").exists()


def test_allowed_account_passes_the_checks(project, capsys, tiny_dataset):
    rc, out, err = submit(
        capsys,
        "--partition",
        "restricted",
        "--account",
        "beta",
        "--dry-run",
        f"data.path={tiny_dataset}",
    )
    assert rc == 0, err
    assert "#SBATCH --partition=restricted\n" in out and "#SBATCH --account=beta\n" in out


def test_unwritable_run_dir_and_changed_config(project, capsys, slurm_cluster, tiny_dataset):
    before = queue(slurm_cluster)
    (project / "afile").write_text("x")
    rc, out, err = submit(
        capsys, f"data.path={tiny_dataset}", "run.dir=afile/run", "tracking.enabled=false"
    )
    assert rc == 2 and "run directory" in err and "is not writable" in err, err
    # a run directory that already holds a different config is refused, naming the key
    run_dir = project / "runs" / "same"
    run_dir.mkdir(parents=True)
    args = [f"data.path={tiny_dataset}", "run.name=same", "tracking.enabled=false", "--dry-run"]
    rc, out, err = submit(capsys, *args)
    assert rc == 0, err
    resolved = out.split("# ---- resolved config")[1].split("\n", 1)[1].split("\n# ----")[0]
    (run_dir / "resolved.yaml").write_text(resolved)
    rc, out, err = submit(capsys, *args, "optim.lr=1e-3")
    assert rc == 2 and "already holds a different config" in err, err
    assert "optim.lr: 0.003 -> 0.001: " in err and "--allow-change optim.lr" in err, err
    rc, out, err = submit(capsys, *args, "optim.lr=1e-3", "--allow-change", "optim.lr")
    assert rc == 0, err
    rc, out, err = submit(capsys, *args, "train.max_steps=600")  # extending a run is fine
    assert rc == 0, err
    # another number of processes under ZeRO-2: refused here, not after waiting in the queue
    rc, out, err = submit(capsys, *args, "--ntasks-per-node", "4", "train.global_batch_size=16")
    assert rc == 2 and "parallel.nproc: 1 -> 4: refused" in err, err
    assert queue(slurm_cluster) == before and not (project / ".rdpt").exists()


def test_submit_prints_job_run_dir_and_mlflow_then_cancel(
    project, capsys, slurm_cluster, tiny_dataset, mlflow_server
):
    from mlflow.tracking import MlflowClient

    rc, out, err = submit(
        capsys,
        "--gpus-per-node",
        "0",
        "--ntasks-per-node",
        "2",
        "--partition",
        "restricted",
        "--account",
        "beta",
        "--time",
        "10:00",
        f"data.path={tiny_dataset}",
        "run.name=printed",
        f"tracking.uri={mlflow_server.url}",
        "tracking.experiment=printed",
    )
    assert rc == 0, err
    lines = out.splitlines()
    run_dir = project / "runs" / "printed"
    job = int(lines[0].split()[2].rstrip(":"))
    assert lines[0] == f"submitted job {job}: {next((run_dir / 'slurm').glob('*.sbatch'))}"
    assert lines[1] == f"run directory: {run_dir}"
    assert lines[2] == f"log:           {run_dir}/slurm/slurm-{job}.out"
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert lines[3].startswith(
        f"mlflow run:    {run_id} (experiment 'printed' at {mlflow_server.url})"
    )
    assert MlflowClient(mlflow_server.url).get_run(run_id).info.run_name == "printed"
    info = slurm_cluster.job(job)
    assert (info["Partition"], info["Account"]) == ("restricted", "beta")
    record = json.loads((project / ".rdpt" / "jobs.jsonl").read_text())
    assert (record["job_id"], record["run_dir"], record["mlflow_run_id"]) == (
        job,
        str(run_dir),
        run_id,
    )
    assert main(["jobs", "cancel", str(job)]) == 0
    assert capsys.readouterr().out.strip() == f"cancelled {job}"
    assert slurm_cluster.wait_finished(job, timeout=60)["JobState"] == "CANCELLED"
    assert main(["jobs", "cancel", "999999"]) == 2
    assert "job 999999 was not submitted from this project" in capsys.readouterr().err
