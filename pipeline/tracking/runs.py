"""Query and compare MLflow runs: the library behind `rdpt runs list` and `rdpt runs compare`.

Loss at depth r for a run comes from the evaluation curve `eval/loss_r` (step = r) when the run
has one, otherwise from the in-training validation metrics `val/loss_r{R}` (last value).
Throughput is the median of the run's `train/tokens_per_s` history (robust to the slow first
steps). MFU is `pipeline.common.mfu.mfu` (the function training and bench/ use) of the median
model TFLOP/s per device (`train/model_tflops`) and the run's device peak (tag `peak_tflops`);
runs logged before those existed fall back to the median of their `train/mfu`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.tracking.credentials import take_credentials
from pipeline.tracking.server import RdptTrackingError, health_ok, running_server

LIST_R = (1, 8, 32)
_VAL_R = re.compile(r"^val/loss_r(\d+)$")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def default_server_root() -> Path:
    """Where `rdpt mlflow-server start` keeps its server when no --root is given."""
    return Path(os.environ.get("RDPT_MLFLOW_ROOT", "mlflow"))


def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the running `rdpt mlflow-server`."""
    uri = take_credentials(uri or os.environ.get("MLFLOW_TRACKING_URI"))
    if not uri:
        running = running_server(default_server_root())
        if running:
            return running[1]
        raise RdptTrackingError(
            "no tracking URI: pass --tracking-uri URL (or sqlite:///file.db), set "
            "MLFLOW_TRACKING_URI, or start a server with `rdpt mlflow-server start`"
        )
    if uri.startswith(("http://", "https://")) and not health_ok(uri, timeout=5.0):
        raise RdptTrackingError(f"no MLflow server answers at {uri} (GET /health failed)")
    return uri


def open_client(tracking_uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))


def find_experiment(client, name: str):
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        known = sorted(e.name for e in client.search_experiments())
        known_s = ", ".join(known) or "none"
        raise RdptTrackingError(f"unknown experiment {name!r} (known: {known_s})")
    return exp


def resolve_run(client, ref: str, experiment: str | None = None):
    """A run by id or by run name (within `experiment`, or all experiments when None)."""
    from mlflow.exceptions import MlflowException

    exps = [find_experiment(client, experiment)] if experiment else client.search_experiments()
    where = f"experiment {experiment!r}" if experiment else "any experiment"
    if _RUN_ID.match(ref):
        try:
            run = client.get_run(ref)
            if experiment is None or run.info.experiment_id == exps[0].experiment_id:
                return run
        except MlflowException:
            pass
    quote = '"' if "'" in ref else "'"
    runs = (
        client.search_runs(
            [e.experiment_id for e in exps],
            filter_string=f"attributes.run_name = {quote}{ref}{quote}",
        )
        if exps
        else []
    )
    if not runs:
        raise RdptTrackingError(f"unknown run {ref!r} in {where}")
    if len(runs) > 1:
        ids = ", ".join(r.info.run_id for r in runs)
        raise RdptTrackingError(
            f"run name {ref!r} is ambiguous in {where}: {len(runs)} runs ({ids}); pass a run id"
        )
    return runs[0]


def loss_by_r(client, run) -> dict[int, float]:
    """{r: loss}: `eval/loss_r` (step = r) overrides `val/loss_r{R}`."""
    out: dict[int, float] = {}
    for key, value in run.data.metrics.items():
        m = _VAL_R.match(key)
        if m:
            out[int(m.group(1))] = value
    if "eval/loss_r" in run.data.metrics:
        latest: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(run.info.run_id, "eval/loss_r"):
            if m.step not in latest or m.timestamp >= latest[m.step][0]:
                latest[m.step] = (m.timestamp, m.value)
        out.update({r: v for r, (_, v) in latest.items()})
    return dict(sorted(out.items()))


def task_curves(client, run) -> dict[str, list[tuple[float, float, int]]]:
    """{method: [(flops per answer, accuracy, knob)]} from `rdpt eval --task`'s metrics
    task/<method>/accuracy and task/<method>/flops_per_answer (step = knob)."""
    out = {}
    for key in sorted(run.data.metrics):
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "task" or parts[2] != "accuracy":
            continue
        acc = {m.step: m.value for m in _history(client, run, key)}
        flops = {
            m.step: m.value for m in _history(client, run, f"task/{parts[1]}/flops_per_answer")
        }
        out[parts[1]] = [(flops.get(k, float("nan")), v, k) for k, v in sorted(acc.items())]
    return out


def _history(client, run, key: str) -> list:
    if key not in run.data.metrics:
        return []
    hist = client.get_metric_history(run.info.run_id, key)
    return sorted(hist, key=lambda m: (m.step, m.timestamp))


def _median(client, run, key: str) -> float | None:
    vals = [m.value for m in _history(client, run, key)]
    return statistics.median(vals) if vals else None


def run_mfu(client, run) -> float | None:
    """The run's MFU from its median model TFLOP/s per device and its peak (see module doc)."""
    from pipeline.common.mfu import mfu

    tflops = _median(client, run, "train/model_tflops")
    peak = run.data.tags.get("peak_tflops")
    if tflops is not None and peak:
        return mfu(tflops * 1e12, 1.0, 1, float(peak) * 1e12)
    return _median(client, run, "train/mfu")


def run_row(client, run, experiment_name: str) -> dict[str, Any]:
    """One row of `rdpt runs list`."""
    m = run.data.metrics
    by_r = loss_by_r(client, run)
    row = {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "experiment": experiment_name,
        "status": run.info.status,
        "tokens": m.get("train/tokens"),
        "final_loss": m.get("train/loss"),
    }
    row.update({f"loss_r{r}": by_r.get(r) for r in LIST_R})
    row["tokens_per_s"] = m.get("train/tokens_per_s")
    return row


def list_runs(
    tracking_uri: str | None = None,
    experiment: str | None = None,
    filter_string: str | None = None,
    max_results: int = 1000,
) -> list[dict[str, Any]]:
    """Rows for runs of `experiment` (or all experiments), newest first, MLflow filter syntax."""
    from mlflow.exceptions import MlflowException

    client = open_client(tracking_uri)
    exps = [find_experiment(client, experiment)] if experiment else client.search_experiments()
    names = {e.experiment_id: e.name for e in exps}
    if not exps:
        return []
    try:
        runs = client.search_runs(
            list(names),
            filter_string=filter_string or "",
            max_results=max_results,
            order_by=["attributes.start_time DESC"],
        )
    except MlflowException as e:
        raise RdptTrackingError(f"bad --filter {filter_string!r}: {e.message}") from e
    return [run_row(client, r, names[r.info.experiment_id]) for r in runs]


def compare_runs(
    refs: Sequence[str],
    tracking_uri: str | None = None,
    experiment: str | None = None,
    out_dir: str | os.PathLike | None = None,
    log_to_runs: bool = True,
) -> dict[str, Any]:
    """Params that differ, metrics side by side and comparison plots for two or more runs.

    Plots (`loss_vs_tokens.png`, `loss_vs_r.png` when any run has depth metrics,
    `telemetry.png` when any run has training telemetry, `task_accuracy.png` when any run has
    `rdpt eval --task` results: accuracy against FLOPs per answer, one line per run and
    method) and
    `comparison.json` are written to `out_dir` (default `comparisons/<id>`), and, with
    `log_to_runs`, logged as artifacts `comparisons/<id>/...` to EACH compared run, where
    `<id>` is `vs-` + the first 8 characters of every run id.
    """
    from pipeline.tracking.plots import (
        TELEMETRY_PANELS,
        plot_loss_vs_r,
        plot_loss_vs_tokens,
        plot_task_accuracy,
        plot_telemetry,
    )

    if len(refs) < 2:
        raise RdptTrackingError("compare needs at least two runs")
    client = open_client(tracking_uri)
    runs = [resolve_run(client, ref, experiment) for ref in refs]
    ids = [r.info.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise RdptTrackingError(f"the same run is named twice: {', '.join(refs)}")
    labels = _labels(runs)
    exp_names = {e.experiment_id: e.name for e in client.search_experiments()}

    keys = sorted(set().union(*(r.data.params for r in runs)))
    differ = {
        k: [r.data.params.get(k) for r in runs]
        for k in keys
        if len({r.data.params.get(k) for r in runs}) > 1
    }

    by_r = [loss_by_r(client, r) for r in runs]
    losses = [_history(client, r, "train/loss") for r in runs]
    metrics: dict[str, list] = {
        "status": [r.info.status for r in runs],
        "tokens": [r.data.metrics.get("train/tokens") for r in runs],
        "final_loss": [r.data.metrics.get("train/loss") for r in runs],
        "best_loss": [min((m.value for m in h), default=None) for h in losses],
        "tokens_per_s": [_median(client, r, "train/tokens_per_s") for r in runs],
        "model_tflops": [_median(client, r, "train/model_tflops") for r in runs],
        "mfu": [run_mfu(client, r) for r in runs],
    }
    for rr in sorted(set().union(*by_r)):
        metrics[f"loss_r{rr}"] = [d.get(rr) for d in by_r]

    comp_id = "vs-" + "-".join(i[:8] for i in ids)
    out = Path(out_dir) if out_dir else Path("comparisons") / comp_id
    out.mkdir(parents=True, exist_ok=True)
    series = {}
    for label, run, hist in zip(labels, runs, losses):
        tokens = {m.step: m.value for m in _history(client, run, "train/tokens")}
        series[label] = [(tokens.get(m.step, m.step), m.value) for m in hist]
    plots = [str(plot_loss_vs_tokens(series, out / "loss_vs_tokens.png"))]
    if any(by_r):
        plots.append(
            str(plot_loss_vs_r({lb: d for lb, d in zip(labels, by_r) if d}, out / "loss_vs_r.png"))
        )
    telemetry = {
        label: {
            key: [(m.step, m.value) for m in _history(client, run, key)]
            for key, _ in TELEMETRY_PANELS
        }
        for label, run in zip(labels, runs)
    }
    if any(pts for by_key in telemetry.values() for pts in by_key.values()):
        plots.append(str(plot_telemetry(telemetry, out / "telemetry.png")))
    per_run = [task_curves(client, run) for run in runs]
    task = {f"{lb} {m}": pts for lb, curves in zip(labels, per_run) for m, pts in curves.items()}
    if task:
        plots.append(str(plot_task_accuracy(task, out / "task_accuracy.png")))
        for method in sorted({m for curves in per_run for m in curves}):
            metrics[f"task_{method}_best_accuracy"] = [
                max((p[1] for p in curves.get(method, [])), default=None) for curves in per_run
            ]
    result = {
        "id": comp_id,
        "runs": [
            {
                "run_id": r.info.run_id,
                "run_name": r.info.run_name,
                "label": lb,
                "experiment": exp_names.get(r.info.experiment_id, r.info.experiment_id),
            }
            for r, lb in zip(runs, labels)
        ],
        "params_differ": differ,
        "params_compared": len(keys),
        "metrics": metrics,
        "plots": plots,
        "artifact_path": f"comparisons/{comp_id}" if log_to_runs else None,
    }
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    if log_to_runs:
        for run_id in ids:
            client.log_artifacts(run_id, str(out), f"comparisons/{comp_id}")
    return result


def _labels(runs) -> list[str]:
    names = [r.info.run_name or r.info.run_id[:8] for r in runs]
    if len(set(names)) == len(names):
        return names
    return [f"{n} ({r.info.run_id[:8]})" for n, r in zip(names, runs)]


# --------------------------------------------------------------------------- formatting


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v.is_integer() and abs(v) >= 1000:
            return f"{int(v)}"
        return f"{v:.4g}"
    return str(v)


def format_rows(rows: list[dict[str, Any]], fmt: str = "md") -> str:
    """A list of same-keyed dicts as a markdown table, CSV or JSON."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    cols = list(rows[0]) if rows else ["run_id", "run_name", "status"]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    return _markdown(cols, [[_cell(r.get(c)) for c in cols] for r in rows])


def format_comparison(result: dict[str, Any], fmt: str = "md") -> str:
    """The result of `compare_runs` as markdown (two tables), CSV or JSON."""
    if fmt == "json":
        return json.dumps(result, indent=2)
    labels = [r["label"] for r in result["runs"]]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["kind", "name", *labels])
        w.writerow(["run", "run_id", *[r["run_id"] for r in result["runs"]]])
        for k, vals in result["params_differ"].items():
            w.writerow(["param", k, *["" if v is None else v for v in vals]])
        for k, vals in result["metrics"].items():
            w.writerow(["metric", k, *["" if v is None else v for v in vals]])
        return buf.getvalue()
    n_same = result["params_compared"] - len(result["params_differ"])
    parts = [f"### params that differ ({len(result['params_differ'])}; {n_same} equal)", ""]
    parts.append(
        _markdown(
            ["param", *labels], [[k, *map(_cell, v)] for k, v in result["params_differ"].items()]
        )
    )
    parts += ["", "### metrics", ""]
    parts.append(
        _markdown(["metric", *labels], [[k, *map(_cell, v)] for k, v in result["metrics"].items()])
    )
    parts += ["", "plots: " + ", ".join(result["plots"])]
    if result.get("artifact_path"):
        parts.append(f"logged to each run under artifacts/{result['artifact_path']}/")
    return "\n".join(parts) + "\n"


def _markdown(cols: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)
