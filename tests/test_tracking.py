"""RunTracker against a real MLflow server on 127.0.0.1 (and a sqlite store)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking.logger import DELIVERED_FILE, METRICS_FILE, RUN_FILE, RunTracker


def _jsonl(run_dir):
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def _history(client, run_id, key):
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)


def test_params_metrics_artifacts_read_back(mlflow_server, tmp_path, experiment_name):
    run_dir = tmp_path / "run"
    tracker = RunTracker(
        run_dir,
        mlflow_server.url,
        experiment_name,
        "readback",
        system_metrics_interval=0.2,
        flush_interval=0.2,
    )
    run_id = tracker.ensure_run()
    assert run_id and json.loads((run_dir / RUN_FILE).read_text())["run_id"] == run_id
    tracker.log_params(
        {
            "model.hidden_size": 128,
            "optim.lr": 3e-4,
            "eval.recurrences": [1, 4],
            "data.path": None,
            "note": "x" * 7000,
            "bad key?": 1,
        }
    )
    tracker.set_tags({"git.commit": "abc123", "world_size": 2})
    losses = [5.0 / (1 + 0.3 * s) for s in range(20)]
    for s, loss in enumerate(losses):
        tracker.log_metrics({"train/loss": loss, "train/tokens": 512 * (s + 1)}, step=s)
    (tmp_path / "resolved.yaml").write_text("model:\n  hidden_size: 128\n")
    tracker.log_artifact(tmp_path / "resolved.yaml", "config")
    small = tmp_path / "ckpt-small"
    small.mkdir()
    (small / "model.safetensors").write_bytes(b"\0" * 1000)
    tracker.log_checkpoint_reference(small, step=10, sha256="aa" * 32)
    big = tmp_path / "ckpt-big.bin"
    big.write_bytes(b"\1" * 5000)
    tracker.checkpoint_artifact_max_bytes = 4096
    tracker.log_checkpoint_reference(big, step=20, size=5000, sha256="bb" * 32)
    time.sleep(0.5)  # at least one system-metrics sample
    assert tracker.close("FINISHED", timeout=60)

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "readback"
    p = run.data.params
    assert p["model.hidden_size"] == "128" and p["optim.lr"] == "0.0003"
    assert p["eval.recurrences"] == "[1, 4]" and p["data.path"] == "None"
    assert len(p["note"]) == 6000 and p["note"].endswith("...")
    assert p["bad key_"] == "1"
    assert run.data.tags["git.commit"] == "abc123" and run.data.tags["world_size"] == "2"
    assert run.data.tags["checkpoint.latest.step"] == "20"
    assert run.data.tags["checkpoint.latest.sha256"] == "bb" * 32
    hist = _history(client, run_id, "train/loss")
    assert [m.step for m in hist] == list(range(20))
    assert [m.value for m in hist] == pytest.approx(losses)
    assert any(k.startswith("system/cpu") for k in run.data.metrics)

    arts = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert {
        "checkpoints/step-00000010.json",
        "checkpoints/step-00000020.json",
        "checkpoints/step-00000010",
    } <= arts
    assert "checkpoints/ckpt-big.bin" not in arts  # over the size limit: reference only
    ref = json.loads(
        open(
            client.download_artifacts(
                run_id, "checkpoints/step-00000020.json", str(tmp_path / "dl")
            )
        ).read()
    )
    assert ref["path"] == str(big) and ref["size"] == 5000 and ref["sha256"] == "bb" * 32
    assert ref["uploaded_as_artifact"] is False
    assert [a.path for a in client.list_artifacts(run_id, "config")] == ["config/resolved.yaml"]

    lines = _jsonl(run_dir)
    assert [r["step"] for r in lines] == list(range(20))
    assert [r["train/loss"] for r in lines] == pytest.approx(losses)


def test_log_metrics_does_not_block(mlflow_server_factory, tmp_path, experiment_name):
    """With the server hung (SIGSTOP: connections accepted by the kernel, never answered) a
    thread logs 1000 steps: were log_metrics waiting for the network it would never finish.
    The outcome depends on that event, not on how fast this machine is."""
    server = mlflow_server_factory()
    tracker = RunTracker(
        tmp_path / "run", server.url, experiment_name, "nonblocking", system_metrics_interval=0
    )
    run_id = tracker.ensure_run()
    os.killpg(server.pid, signal.SIGSTOP)
    try:

        def log_all():
            for step in range(1000):
                tracker.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": 1e-3}, step)

        logger = threading.Thread(target=log_all, daemon=True)
        logger.start()
        logger.join(timeout=300)  # a hang guard only: it takes milliseconds
        assert not logger.is_alive(), "log_metrics waits for a hung server"
        assert len(_jsonl(tmp_path / "run")) == 1000  # every line journaled meanwhile
    finally:
        os.killpg(server.pid, signal.SIGCONT)
    assert tracker.close(timeout=120)
    client = MlflowClient(server.url)
    assert len(client.get_metric_history(run_id, "train/loss")) == 1000


def test_server_down_then_back_loses_nothing_and_duplicates_nothing(
    mlflow_server_factory, tmp_path, experiment_name
):
    server = mlflow_server_factory()
    run_dir = tmp_path / "run"
    tracker = RunTracker(
        run_dir,
        server.url,
        experiment_name,
        "outage",
        system_metrics_interval=0,
        flush_interval=0.2,
    )
    run_id = tracker.ensure_run()
    value = lambda s: 10.0 - 0.01 * s  # noqa: E731
    for s in range(0, 50):
        tracker.log_metrics({"train/loss": value(s)}, step=s)
    assert tracker.flush(30)

    server.stop()
    for s in range(50, 150):  # while the server is down
        tracker.log_metrics({"train/loss": value(s)}, step=s)
    deadline = time.monotonic() + 300  # a hang guard: the thread tries within a second
    while not tracker.stats["send_failures"]:
        assert time.monotonic() < deadline, "the sender never tried the dead server"
        time.sleep(0.05)
    assert tracker.pending > 0
    assert not tracker.flush(timeout=0.5)
    assert len(_jsonl(run_dir)) == 150

    server = mlflow_server_factory(root=server.root, port=server.port)  # same store, same URL
    assert tracker.flush(timeout=60)
    client = MlflowClient(server.url)
    hist = _history(client, run_id, "train/loss")
    assert [m.step for m in hist] == list(range(150))  # each step exactly once
    assert [m.value for m in hist] == pytest.approx([value(s) for s in range(150)])

    # The job ends while the server hangs (SIGSTOP: connections accepted by the kernel, no
    # answer): the rest is delivered by the next tracker (a resumed job) on the same run dir,
    # into the same MLflow run.
    os.killpg(server.pid, signal.SIGSTOP)
    try:
        for s in range(150, 200):
            tracker.log_metrics({"train/loss": value(s)}, step=s)
        t0 = time.perf_counter()
        assert tracker.close("KILLED", timeout=3600, down_grace=2.0) is False
        # gave up on the hung server after its grace, not after the hour (a 100x margin)
        assert time.perf_counter() - t0 < 600
    finally:
        os.killpg(server.pid, signal.SIGCONT)
    resumed = RunTracker(run_dir, server.url, experiment_name, "outage", system_metrics_interval=0)
    assert resumed.ensure_run() == run_id
    assert resumed.close(timeout=60)
    hist = _history(client, run_id, "train/loss")
    assert [m.step for m in hist] == list(range(200))
    assert [m.value for m in hist] == pytest.approx([value(s) for s in range(200)])
    assert len(_jsonl(run_dir)) == 200
    delivered = json.loads((run_dir / DELIVERED_FILE).read_text())
    assert delivered == {"run_id": run_id, "offset": (run_dir / METRICS_FILE).stat().st_size}


def test_resume_continues_the_same_run(mlflow_server, tmp_path, experiment_name):
    run_dir = tmp_path / "run"
    first = RunTracker(
        run_dir, mlflow_server.url, experiment_name, "resumed", system_metrics_interval=0
    )
    run_id = first.ensure_run()
    first.log_params({"optim.lr": 1e-3, "train.max_steps": 10})
    for s in range(5):
        first.log_metrics({"train/loss": 3.0 - 0.1 * s}, step=s)
    assert first.close("KILLED")
    client = MlflowClient(mlflow_server.url)
    assert client.get_run(run_id).info.status == "KILLED"
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write('{"step": 5, "timest')  # the job was killed in the middle of a line

    second = RunTracker(
        run_dir, mlflow_server.url, experiment_name, "resumed", system_metrics_interval=0
    )
    assert second.ensure_run() == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    second.log_params({"optim.lr": 1e-3, "train.max_steps": 20})  # max_steps raised on resume
    for s in range(5, 10):
        second.log_metrics({"train/loss": 3.0 - 0.1 * s}, step=s)
    assert second.close("FINISHED")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "10"
    assert run.data.tags["rdpt.param_changed.train.max_steps"] == "20"
    assert [m.step for m in _history(client, run_id, "train/loss")] == list(range(10))
    runs = client.search_runs([run.info.experiment_id])
    assert len(runs) == 1
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    assert lines[5] == '{"step": 5, "timest'  # the torn line stays alone, the rest parses
    assert [json.loads(x)["step"] for x in lines[:5] + lines[6:]] == list(range(10))


def test_sqlite_store_and_disabled(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = RunTracker(tmp_path / "run", None, "local", "sqlite-run", system_metrics_interval=0)
    run_id = tracker.ensure_run()
    tracker.log_metrics({"train/loss": 2.5}, step=3)
    tracker.log_artifact(tmp_path / "run" / METRICS_FILE)
    assert tracker.close()
    client = MlflowClient(uri)
    assert client.get_run(run_id).data.metrics["train/loss"] == 2.5
    assert [a.path for a in client.list_artifacts(run_id)] == [METRICS_FILE]
    assert (tmp_path / "store" / "artifacts").is_dir()  # artifacts next to the database

    off = RunTracker(tmp_path / "off", uri, "local", "disabled", enabled=False)
    assert off.ensure_run() is None
    off.log_params({"a": 1})
    off.log_metrics({"train/loss": 1.5}, step=1)
    assert off.close()
    assert _jsonl(tmp_path / "off")[0]["train/loss"] == 1.5
    assert not (tmp_path / "off" / RUN_FILE).exists()


def test_bad_metric_name_and_use_after_close(tmp_path):
    tracker = RunTracker(tmp_path / "run", None, enabled=False)
    with pytest.raises(ValueError, match="invalid metric name 'loss\\?'"):
        tracker.log_metrics({"loss?": 1.0}, step=0)
    with pytest.raises(ValueError, match="status must be"):
        tracker.close("DONE")
    tracker.close()
    with pytest.raises(RuntimeError, match="after close"):
        tracker.log_metrics({"train/loss": 1.0}, step=1)


def test_mlflow_server_cli_start_is_idempotent_and_stop_stops(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.common.distributed import free_port
    from pipeline.tracking.server import health_ok, process_alive

    root, port = tmp_path / "srv", free_port()
    args = ["mlflow-server", "start", "--root", str(root), "--port", str(port)]
    try:
        assert main(args) == 0
        url = capsys.readouterr().out.strip()
        assert url == f"http://127.0.0.1:{port}" and health_ok(url)
        assert (root / "server.url").read_text().strip() == url
        pid = int((root / "server.pid").read_text())
        assert main(args) == 0  # already running: same URL, no second server
        out, err = capsys.readouterr()
        assert out.strip() == url and "already running" in err
        assert int((root / "server.pid").read_text()) == pid
        assert main(["mlflow-server", "status", "--root", str(root)]) == 0
        assert url in capsys.readouterr().out
    finally:
        assert main(["mlflow-server", "stop", "--root", str(root)]) == 0
    assert capsys.readouterr().out.strip() == "stopped"
    assert not process_alive(pid) and not health_ok(url)
    assert main(["mlflow-server", "status", "--root", str(root)]) == 1
    assert not (root / "server.pid").exists()
