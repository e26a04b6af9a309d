"""Sharing and secrets: outputs get the umask's mode (a teammate can verify and evaluate a
checkpoint), credentials in a tracking URI are never written anywhere, and the job registry
is private to its user."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from fixtures_training import training_env

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-t0ken"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_outputs_get_the_mode_of_a_plain_open(tmp_path):
    from pipeline.common.atomic import atomic_directory, atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "f.json", "{}")
        with atomic_directory(tmp_path / "d") as d:
            (d / "x").write_text("1")
        plain = tmp_path / "plain"
        plain.write_text("")
        (tmp_path / "plain-dir").mkdir()
    finally:
        os.umask(old)
    assert _mode(tmp_path / "f.json") == _mode(plain) == 0o640
    assert _mode(tmp_path / "d") == _mode(tmp_path / "plain-dir") == 0o750


def test_checkpoint_and_run_files_are_readable_as_a_plain_open_makes_them(
    tiny_trained_run, tmp_path
):
    from pipeline.common.atomic import default_mode
    from pipeline.training.export import export_checkpoint

    ckpt = tiny_trained_run / "checkpoints" / "step-00000060"
    files = [
        ckpt / "files.sha256.json",
        ckpt / "trainer_state.json",
        tiny_trained_run / "checkpoints" / "latest",
        tiny_trained_run / "resolved.yaml",
        tiny_trained_run / "COMPLETED",
    ]
    for f in files:
        assert _mode(f) == default_mode(), f
    out = export_checkpoint(tiny_trained_run, tmp_path / "export")
    assert _mode(out) == default_mode(directory=True)
    assert all(_mode(f) == default_mode() for f in out.iterdir())


def test_credentials_in_the_tracking_uri_are_never_written(tiny_dataset, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    host = mlflow_server.url.split("://", 1)[1]
    uri = f"http://alice:{SECRET}@{host}"
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "train",
        str(REPO / "configs/train/tiny.yaml"),
        f"data.path={tiny_dataset}",
        f"run.dir={run_dir}",
        "run.name=creds",
        "train.max_steps=2",
        "train.log_interval=1",
        "eval.interval=0",
        "checkpoint.interval=2",
        f"tracking.uri={uri}",
        "tracking.experiment=rdpt-tests-creds",
        "--nproc",
        "1",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=training_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert SECRET not in out.stdout + out.stderr
    leaks = [
        str(p) for p in run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()
    ]
    assert not leaks, f"the credential was written into {leaks}"
    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    assert saved["tracking_uri"] == mlflow_server.url
    run = MlflowClient(mlflow_server.url).get_run(saved["run_id"])
    assert run.data.params["tracking.uri"] == mlflow_server.url  # logged, but bare
    assert all(SECRET not in v for v in {**run.data.params, **run.data.tags}.values())
    assert run.data.metrics["train/loss"] > 0  # and the run was tracked all the same


def test_job_registry_is_private_and_submit_records_the_bare_uri(
    tiny_dataset, mlflow_server, tmp_path, monkeypatch
):
    from launch import registry
    from launch.render import SbatchOptions
    from launch.site import SiteConfig
    from launch.submit import ensure_mlflow_run, plan_train

    path = tmp_path / ".rdpt" / "jobs.jsonl"
    path.parent.mkdir()
    path.write_text("")
    path.chmod(0o644)  # a registry from before it was made private
    registry.append({"job_id": 1}, path)
    assert _mode(path) == 0o600
    host = mlflow_server.url.split("://", 1)[1]
    plan = plan_train(
        str(REPO / "configs/train/tiny.yaml"),
        [
            f"data.path={tiny_dataset}",
            f"run.dir={tmp_path / 'run'}",
            f"tracking.uri=http://alice:{SECRET}@{host}",
        ],
        SbatchOptions(ntasks_per_node=2, time="1:00:00"),
        SiteConfig(),
    )
    assert SECRET not in plan.resolved_yaml and SECRET not in plan.jobs[0].script
    mlflow = ensure_mlflow_run(plan)
    assert mlflow["tracking_uri"] == mlflow_server.url and mlflow["run_id"]
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET  # for the job, in memory only
