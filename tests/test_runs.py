"""`rdpt runs list` / `rdpt runs compare` on real MLflow runs logged with RunTracker."""

from __future__ import annotations

import csv
import io
import json
import uuid

import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.tracking.logger import RunTracker

RS = (1, 2, 4, 8, 32)
BASE_PARAMS = {
    "model.hidden_size": 128,
    "model.num_layers": 4,
    "train.max_steps": 12,
    "recurrence.mean": 8,
    "data.path": "/data/demo",
}


def _loss_curve(lr: float) -> list[float]:
    return [6.0 * (1.0 - lr * 200) ** s + 2.0 for s in range(12)]


PEAK_TFLOPS = 400.0


def _depth_curve(lr: float) -> dict[int, float]:
    return {r: 3.0 + 2.0 / r + lr * 100 for r in RS}


@pytest.fixture(scope="module")
def two_runs(mlflow_server, tmp_path_factory):
    """Two finished runs differing only in optim.lr, with loss curves and depth metrics."""
    experiment = f"runs-{uuid.uuid4().hex[:8]}"
    runs = {}
    for name, lr in (("lr-small", 1e-3), ("lr-large", 2e-3)):
        run_dir = tmp_path_factory.mktemp(name)
        t = RunTracker(run_dir, mlflow_server.url, experiment, name, system_metrics_interval=0)
        run_id = t.ensure_run()
        t.log_params({**BASE_PARAMS, "optim.lr": lr})
        for s, loss in enumerate(_loss_curve(lr)):
            t.log_metrics(
                {
                    "train/loss": loss,
                    "train/tokens": 4096 * (s + 1),
                    "train/tokens_per_s": 1000.0 + 10 * s + lr * 1e5,
                    "train/mfu": 0.1 + lr,
                    "train/model_tflops": PEAK_TFLOPS * (0.1 + lr) + s,
                },
                step=s,
            )
        t.set_tags({"peak_tflops": str(PEAK_TFLOPS)})
        t.log_metrics({"val/loss_r8": 9.0, "val/loss_r1": 9.5}, step=11)  # superseded by eval
        for r, loss in _depth_curve(lr).items():
            t.log_metrics({"eval/loss_r": loss}, step=r)
        assert t.close()
        runs[name] = (run_id, lr)
    return experiment, runs


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_runs_list_shows_status_tokens_and_losses(mlflow_server, two_runs, capsys):
    experiment, runs = two_runs
    code, out, _ = _run(
        capsys,
        "runs",
        "list",
        "--experiment",
        experiment,
        "--tracking-uri",
        mlflow_server.url,
        "--format",
        "json",
    )
    assert code == 0
    rows = {r["run_name"]: r for r in json.loads(out)}
    assert set(rows) == set(runs)
    for name, (run_id, lr) in runs.items():
        row = rows[name]
        assert row["run_id"] == run_id and row["status"] == "FINISHED"
        assert row["tokens"] == 4096 * 12
        assert row["final_loss"] == pytest.approx(_loss_curve(lr)[-1])
        for r in (1, 8, 32):
            assert row[f"loss_r{r}"] == pytest.approx(_depth_curve(lr)[r])
        assert row["tokens_per_s"] == pytest.approx(1000.0 + 110 + lr * 1e5)

    code, out, _ = _run(
        capsys,
        "runs",
        "list",
        "--experiment",
        experiment,
        "--tracking-uri",
        mlflow_server.url,
        "--filter",
        "params.optim.lr = '0.002'",
        "--format",
        "csv",
    )
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["run_name"] for r in rows] == ["lr-large"]

    code, out, _ = _run(
        capsys, "runs", "list", "--experiment", experiment, "--tracking-uri", mlflow_server.url
    )
    assert code == 0 and "| lr-small" in out and "| lr-large" in out and "2 run(s)" in out


def test_runs_compare_shows_exactly_the_differing_param(mlflow_server, two_runs, capsys, tmp_path):
    experiment, runs = two_runs
    (id_a, lr_a), (id_b, lr_b) = runs["lr-small"], runs["lr-large"]
    out_dir = tmp_path / "cmp"
    code, out, err = _run(
        capsys,
        "runs",
        "compare",
        "lr-small",
        id_b,
        "--experiment",
        experiment,
        "--tracking-uri",
        mlflow_server.url,
        "--out",
        str(out_dir),
        "--format",
        "json",
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["params_differ"] == {"optim.lr": [str(lr_a), str(lr_b)]}
    assert res["params_compared"] == len(BASE_PARAMS) + 1
    m = res["metrics"]
    assert m["final_loss"] == pytest.approx([_loss_curve(lr)[-1] for lr in (lr_a, lr_b)])
    assert m["best_loss"] == pytest.approx([min(_loss_curve(lr)) for lr in (lr_a, lr_b)])
    for r in RS:
        assert m[f"loss_r{r}"] == pytest.approx([_depth_curve(lr)[r] for lr in (lr_a, lr_b)])
    # MFU: the shared function of the median TFLOP/s per device (steps 0..11: +5.5) and the
    # run's peak tag, not the median of the logged per-interval train/mfu
    tflops = [PEAK_TFLOPS * (0.1 + lr) + 5.5 for lr in (lr_a, lr_b)]
    assert m["model_tflops"] == pytest.approx(tflops)
    assert m["mfu"] == pytest.approx([0.1 + lr + 5.5 / PEAK_TFLOPS for lr in (lr_a, lr_b)])
    assert m["tokens_per_s"] == pytest.approx([1055.0 + lr * 1e5 for lr in (lr_a, lr_b)])

    for name in ("loss_vs_tokens.png", "loss_vs_r.png", "comparison.json"):
        assert (out_dir / name).stat().st_size > 1000 or name == "comparison.json"
    assert (out_dir / "loss_vs_r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = MlflowClient(mlflow_server.url)
    for run_id in (id_a, id_b):
        arts = {a.path for a in client.list_artifacts(run_id, res["artifact_path"])}
        assert f"{res['artifact_path']}/loss_vs_tokens.png" in arts
        assert f"{res['artifact_path']}/loss_vs_r.png" in arts

    code, out, _ = _run(
        capsys,
        "runs",
        "compare",
        id_a,
        id_b,
        "--tracking-uri",
        mlflow_server.url,
        "--out",
        str(tmp_path / "md"),
        "--no-log",
    )
    assert code == 0
    assert "params that differ (1;" in out and "| optim.lr" in out
    assert "model.hidden_size" not in out
    assert "| best_loss" in out and "| loss_r32" in out


def test_bad_run_references_give_clear_errors(mlflow_server, two_runs, capsys, tmp_path):
    experiment, runs = two_runs
    base = ["--tracking-uri", mlflow_server.url, "--out", str(tmp_path), "--no-log"]
    code, _, err = _run(
        capsys, "runs", "compare", "lr-small", "no-such-run", "--experiment", experiment, *base
    )
    assert code == 2
    assert f"unknown run 'no-such-run' in experiment '{experiment}'" in err

    code, _, err = _run(capsys, "runs", "compare", "lr-small", "0" * 32, *base)
    assert code == 2 and f"unknown run '{'0' * 32}' in any experiment" in err

    code, _, err = _run(
        capsys,
        "runs",
        "compare",
        "lr-small",
        "lr-large",
        "--experiment",
        "no-such-experiment",
        *base,
    )
    assert code == 2 and "unknown experiment 'no-such-experiment'" in err and experiment in err

    dup = RunTracker(
        tmp_path / "dup", mlflow_server.url, experiment, "lr-small", system_metrics_interval=0
    )
    dup.ensure_run()
    dup.close()
    code, _, err = _run(
        capsys, "runs", "compare", "lr-small", "lr-large", "--experiment", experiment, *base
    )
    assert code == 2 and "run name 'lr-small' is ambiguous" in err and runs["lr-small"][0] in err

    code, _, err = _run(capsys, "runs", "list", "--tracking-uri", "http://127.0.0.1:9")
    assert code == 2 and "no MLflow server answers at http://127.0.0.1:9" in err
