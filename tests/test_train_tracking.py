"""Training keeps going while its MLflow server is stopped and restarted mid-run, or is not
there at all when training starts, and no metric is lost or delivered twice: what the server
did not get before training ended is kept in the run directory and `rdpt runs sync` delivers
it, so outcomes never depend on how fast the server comes back. Checkpoints of the fixture run
load for inference and export (safetensors and the HF Huginn layout) to weights that reproduce
the trained model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures_training import REPO, training_env

STEPS = 24


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def test_training_survives_mlflow_server_restart(tiny_dataset, mlflow_server_factory, tmp_path):
    from mlflow.tracking import MlflowClient

    server = mlflow_server_factory()
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "train",
        str(REPO / "configs/train/tiny.yaml"),
        f"data.path={tiny_dataset}",
        f"run.dir={run_dir}",
        "run.name=mlflow-outage",
        f"train.max_steps={STEPS}",
        "train.global_batch_size=4",
        "train.log_interval=1",
        "eval.interval=0",
        "checkpoint.interval=12",
        "debug.sleep_per_step_s=0.15",
        f"tracking.uri={server.url}",
        "tracking.experiment=outage",
        "--nproc",
        "1",
    ]
    log = open(tmp_path / "console.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=training_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while _steps_logged(run_dir) < 4:
        assert proc.poll() is None and time.monotonic() < deadline, (
            tmp_path / "console.log"
        ).read_text()[-3000:]
        time.sleep(0.1)
    server.stop()
    down_at = _steps_logged(run_dir)
    while _steps_logged(run_dir) < down_at + 6:  # keeps training while the server is down
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    server = mlflow_server_factory(root=server.root, port=server.port)
    assert proc.wait(timeout=300) == 0, (tmp_path / "console.log").read_text()[-3000:]
    # Whether training outlived the outage depends on the machine's speed: what did not arrive
    # before it ended is kept in the run directory; sync delivers it (a no-op otherwise).
    sync = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "runs", "sync", str(run_dir)],
        cwd=REPO,
        env=training_env(),
        capture_output=True,
        text=True,
    )
    assert sync.returncode == 0, sync.stderr[-3000:]

    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    _assert_delivered_exactly_once(MlflowClient(server.url), run_id, run_dir, STEPS)
    assert MlflowClient(server.url).get_run(run_id).info.status == "FINISHED"


def _assert_delivered_exactly_once(client, run_id: str, run_dir: Path, steps: int) -> None:
    history = client.get_metric_history(run_id, "train/loss")
    local = {
        json.loads(line)["step"]: json.loads(line)["train/loss"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    }
    assert sorted(m.step for m in history) == list(range(1, steps + 1)) == sorted(local)
    assert all(m.value == pytest.approx(local[m.step]) for m in history)


def test_mlflow_absent_at_start_training_runs_and_runs_sync_delivers_it_once(
    tiny_dataset, mlflow_server_factory, tmp_path
):
    from mlflow.tracking import MlflowClient

    from launch.render import SbatchOptions
    from launch.site import SiteConfig
    from launch.submit import ensure_mlflow_run, plan_train
    from pipeline.common.distributed import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there yet
    run_dir, steps = tmp_path / "run", 6
    overrides = [
        f"data.path={tiny_dataset}",
        f"run.dir={run_dir}",
        "run.name=late-server",
        f"train.max_steps={steps}",
        "train.global_batch_size=4",
        "train.log_interval=1",
        "eval.interval=0",
        "checkpoint.interval=6",
        f"tracking.uri={url}",
        "tracking.experiment=late",
    ]
    # `rdpt submit` with the server down: no run yet, nothing fails, training will create it
    plan = plan_train(
        str(REPO / "configs/train/tiny.yaml"),
        overrides,
        SbatchOptions(ntasks_per_node=1, time="1:00:00"),
        SiteConfig(),
    )
    assert ensure_mlflow_run(plan)["run_id"] is None
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "train",
            str(REPO / "configs/train/tiny.yaml"),
            *overrides,
            "--nproc",
            "1",
        ],
        cwd=REPO,
        env=training_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    console = train.stdout + train.stderr
    assert f"did not receive {steps} metric lines (steps 1-{steps})" in console
    assert f"rdpt runs sync {run_dir}" in console
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == steps
    assert json.loads((run_dir / "mlflow_pending.json").read_text())["ops"]  # params, tags...

    server = mlflow_server_factory(port=int(url.rsplit(":", 1)[1]))
    cli = [sys.executable, "-m", "pipeline.cli", "runs", "sync", str(run_dir)]
    first = subprocess.run(cli, cwd=REPO, env=training_env(), capture_output=True, text=True)
    assert first.returncode == 0 and f"replayed {steps} metric line(s)" in first.stdout, first
    again = subprocess.run(cli, cwd=REPO, env=training_env(), capture_output=True, text=True)
    assert again.returncode == 0 and "replayed 0 metric line(s)" in again.stdout, again
    client = MlflowClient(server.url)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    _assert_delivered_exactly_once(client, run_id, run_dir, steps)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "late-server"
    assert run.data.params["model.hidden_size"] == "128"  # the params were kept and sent
    assert not (run_dir / "mlflow_pending.json").exists()


def test_checkpoint_loads_for_inference_and_exports(tiny_trained_run, tmp_path):
    import torch

    from pipeline.common.atomic import sha256_file
    from pipeline.eval.loading import load_for_inference
    from pipeline.model.consolidated import consolidated_name, load_consolidated
    from pipeline.model.hf_convert import read_hf_dir
    from pipeline.training.export import export_checkpoint

    model, cfg, data, meta = load_for_inference(tiny_trained_run)
    assert meta["step"] == 60 and meta["checkpoint"].endswith("step-00000060")
    # the MLflow reference names the checkpoint by path, size and the digest of its file list
    ckpt = Path(meta["checkpoint"])
    ref = json.loads((tiny_trained_run / "mlflow_refs/step-00000060.json").read_text())
    assert ref["path"] == str(ckpt.resolve()) and ref["step"] == 60
    assert ref["sha256"] == sha256_file(ckpt / "files.sha256.json")
    assert ref["size"] == sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    assert cfg.parallel.zero_stage == 2 and data.vocab_size == cfg.model.vocab_size
    ids = torch.arange(32).reshape(2, 16) % cfg.model.vocab_size
    with torch.no_grad():
        ref = model(ids, r=4, state_init="zero").logits_BSV
    out = export_checkpoint(tiny_trained_run, tmp_path / "st")
    mcfg, sd = load_consolidated(out)
    assert mcfg == cfg.model
    params = dict(model.named_parameters())
    assert len(params) == len(sd)
    for name, p in params.items():
        assert torch.equal(sd[consolidated_name(name)], p.detach()), name
    # the HF export, run by the independent plain-PyTorch Huginn forward, gives the logits of
    # the trained model loaded for inference
    from test_model_reference import huginn_forward

    hf_cfg, hf_sd = read_hf_dir(export_checkpoint(tiny_trained_run, tmp_path / "hf", fmt="hf"))
    s0 = torch.zeros(*ids.shape, cfg.model.hidden_size)
    with torch.no_grad():
        hf_logits = huginn_forward(hf_sd, hf_cfg, ids, 4, s0)
    torch.testing.assert_close(hf_logits, ref, atol=2e-4, rtol=2e-4)
    assert not torch.equal(ref[0, 0], ref[0, 1])  # logits of a real model, not a constant
