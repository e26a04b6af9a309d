"""Outputs of `rdpt eval`: the printed table, the JSON file, PNG plots and MLflow logging.

MLflow: when the run directory has `mlflow_run.json` (training logged to MLflow), metrics and
plots go into that same run: `eval/loss_r` and `eval/ppl_r` with step = r (MLflow then plots
loss against depth), per-iteration telemetry `eval/iter_*` with step = iteration, adaptive-exit
and lm-eval figures with step = the checkpoint's training step, PNGs and the JSON under the
artifact folder `eval/`. The run keeps the status it had (a run still training stays RUNNING).
Without `mlflow_run.json` but with a tracking URI, a new run `eval-<name>` is created (its
record lives in <run_dir>/eval/), tagged `rdpt.eval_of` with the evaluated path.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

log = logging.getLogger("rdpt.eval")


def print_table(results: dict) -> None:
    """The loss-against-depth table (and adaptive / lm-eval summaries) on stdout."""
    step = results.get("step")
    print(
        f"\nloss against recurrence depth ({results['tokens']} tokens, "
        f"{results['sequences']} sequences, state init {results['state_init']}, "
        f"seed {results['seed']}{'' if step is None else f', checkpoint step {step}'})"
    )
    print(f"{'r':>5} {'loss':>9} {'ppl':>10}")
    for r in results["recurrences"]:
        v = results["depth"][str(r)]
        print(f"{r:>5} {v['loss']:>9.4f} {v['ppl']:>10.2f}")
    ad = results.get("adaptive")
    if ad:
        saved = ad["compute_saved"]
        eq = ad["equal_loss_r"]
        print(
            f"\nadaptive exit ({ad['criterion']} < {ad['threshold']:g}, max r {ad['max_r']}): "
            f"loss {ad['loss']:.4f}, mean depth {ad['mean_depth']:.2f}; "
            + (
                f"fixed r with equal loss: {eq}, compute saved {100 * saved:.1f}%"
                if eq
                else "no fixed r up to max r reaches that loss"
            )
            + f"; vs max r: {100 * ad['compute_saved_vs_max_r']:.1f}% saved"
        )
        hist = " ".join(f"{d}:{c}" for d, c in ad["histogram"].items())
        print(f"exit-depth histogram (depth:tokens): {hist}")
    curve = results.get("adaptive_curve")
    if curve:
        print(
            "\nloss against mean depth (threshold: loss / mean depth / compute saved at equal loss)"
        )
        for criterion, points in curve.items():
            cells = [
                f"{p['threshold']:g}: {p['loss']:.4f}/{p['mean_depth']:.2f}/"
                + ("-" if p["compute_saved"] is None else f"{100 * p['compute_saved']:.0f}%")
                for p in points
            ]
            print(f"  {criterion}: " + ", ".join(cells))
    by_cat = results.get("adaptive_by_category")
    if by_cat:
        print("\nmean exit depth per category (fresh state / continuous CoT):")
        for category, per in by_cat["categories"].items():
            print(
                f"  {category}: {per['plain']['mean_depth']:.2f} / {per['cot']['mean_depth']:.2f}"
                f" ({per['plain']['tokens']} tokens)"
            )
    lm = results.get("lm_eval")
    if lm:
        print(f"\nlm-eval at r={lm['r']}{' (adaptive)' if lm['adaptive'] else ''}:")
        for task, metrics in lm["tasks"].items():
            vals = ", ".join(
                f"{k.split(',')[0]}={v:.4f}"
                for k, v in metrics.items()
                if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)
            )
            print(f"  {task}: {vals}")


def default_json_path(results: dict, base: Path) -> Path:
    step = results.get("step")
    return base / (f"eval-step{int(step):08d}.json" if step is not None else "eval.json")


def training_curve(run_dir: Path) -> list[tuple[float, float]]:
    """(tokens, train/loss) pairs from <run_dir>/metrics.jsonl (empty when absent)."""
    path = run_dir / "metrics.jsonl"
    out = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "train/loss" in rec and "train/tokens" in rec:
            out.append((float(rec["train/tokens"]), float(rec["train/loss"])))
    return sorted(out)


def make_plots(results: dict, out_dir: Path, run_dir: Path | None) -> list[Path]:
    """PNG files: loss_vs_r, exit_histogram, loss_vs_mean_depth, exit_depth_<category> (one
    per category, fresh state and continuous CoT side by side), state_convergence,
    loss_vs_tokens."""
    from pipeline.tracking import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        plots.plot_loss_vs_r(
            {int(r): v["loss"] for r, v in results["depth"].items()}, out_dir / "loss_vs_r.png"
        )
    ]
    ad = results.get("adaptive")
    if ad:
        hist = {int(d): c for d, c in ad["histogram"].items()}
        paths.append(plots.plot_exit_histogram(hist, out_dir / "exit_histogram.png"))
    curve = results.get("adaptive_curve")
    if curve and ad:
        paths.append(
            plots.plot_loss_vs_mean_depth(
                {c: [(p["mean_depth"], p["loss"]) for p in pts] for c, pts in curve.items()},
                {r: loss for r, loss in enumerate(ad["fixed_loss"], start=1)},
                out_dir / "loss_vs_mean_depth.png",
            )
        )
    by_cat = results.get("adaptive_by_category")
    if by_cat:
        for category, per in by_cat["categories"].items():
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", category).strip("_") or "category"
            hists = {
                label: {int(d): c for d, c in per[cond]["histogram"].items()}
                for cond, label in (("plain", "fresh state"), ("cot", "continuous CoT"))
            }
            paths.append(
                plots.plot_exit_histograms(
                    hists,
                    by_cat["max_r"],
                    out_dir / f"exit_depth_{slug}.png",
                    f"exit depth: {category} ({by_cat['criterion']} < {by_cat['threshold']:g})",
                )
            )
    tel = results.get("telemetry") or {}
    curves = {
        name: tel[key]
        for key, name in (
            ("rel_change", "relative state change"),
            ("state_cosine", "state cosine"),
            ("loss", "loss"),
        )
        if tel.get(key)
    }
    if curves:
        paths.append(plots.plot_state_convergence(curves, out_dir / "state_convergence.png"))
    curve = training_curve(run_dir) if run_dir else []
    if curve:
        label = run_dir.name
        paths.append(plots.plot_loss_vs_tokens({label: curve}, out_dir / "loss_vs_tokens.png"))
    return paths


def _metric_key(text: str) -> str:
    return re.sub(r"[^\w.\- /]", "_", text).strip("_") or "value"


def eval_metrics(results: dict) -> list[tuple[dict, int]]:
    """(metrics, step) groups for MLflow."""
    groups = [
        ({"eval/loss_r": v["loss"], "eval/ppl_r": v["ppl"]}, int(r))
        for r, v in results["depth"].items()
    ]
    tel = results.get("telemetry") or {}
    for i, it in enumerate(tel.get("iteration", [])):
        m = {
            f"eval/iter_{k}": tel[k][i]
            for k in ("rel_change", "state_cosine", "loss")
            if tel.get(k)
        }
        if m:
            groups.append((m, int(it)))
    step = int(results.get("step") or 0)
    ad = results.get("adaptive")
    if ad:
        m = {
            "eval/adaptive_loss": ad["loss"],
            "eval/adaptive_mean_depth": ad["mean_depth"],
            "eval/adaptive_compute_saved_vs_max_r": ad["compute_saved_vs_max_r"],
        }
        if ad["compute_saved"] is not None:
            m["eval/adaptive_compute_saved"] = ad["compute_saved"]
        groups.append((m, step))
    lm = results.get("lm_eval")
    if lm:
        m = {}
        for task, metrics in lm["tasks"].items():
            for k, v in metrics.items():
                if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool):
                    m[f"eval/lm_eval/{_metric_key(task)}/{_metric_key(k.split(',')[0])}"] = v
        if m:
            groups.append((m, step))
    return groups


def open_tracker(run_dir: Path | None, tracking_uri, cfg, target: str):
    """(RunTracker, previous status of the run) or (None, None) without a tracking URI."""
    import os

    from pipeline.tracking.logger import RunTracker

    saved = {}
    if run_dir is not None and (run_dir / "mlflow_run.json").is_file():
        saved = json.loads((run_dir / "mlflow_run.json").read_text())
    from pipeline.tracking.credentials import take_credentials

    uri = take_credentials(
        tracking_uri or saved.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    )
    if not uri:
        log.info("no MLflow tracking URI: results are in the JSON file and PNGs only")
        return None, None
    experiment = saved.get("experiment") or (cfg.tracking.experiment if cfg else "rdpt")
    prev_status = None
    if saved.get("run_id"):
        tracker_dir, run_name = run_dir, saved.get("run_name")
        try:
            from mlflow.tracking import MlflowClient

            prev_status = MlflowClient(tracking_uri=uri).get_run(saved["run_id"]).info.status
        except Exception as e:  # noqa: BLE001 - server down: the tracker buffers and retries
            log.warning("MLflow run %s not reachable now (%s)", saved["run_id"], e)
    else:
        base = run_dir if run_dir is not None else Path(target).resolve().parent
        tracker_dir, run_name = base / "eval", f"eval-{base.name}"
    tracker = RunTracker(tracker_dir, uri, experiment, run_name, system_metrics_interval=None)
    tracker.ensure_run()
    if not saved.get("run_id"):
        tracker.set_tags({"rdpt.eval_of": str(Path(target).resolve())})
    return tracker, prev_status


def finish_tracker(tracker, prev_status) -> None:
    """Deliver everything; keep the run's status (a run still training stays RUNNING)."""
    if prev_status == "RUNNING":
        ok = tracker.flush(timeout=60)
    else:
        ok = tracker.close(
            prev_status if prev_status in ("FAILED", "KILLED") else "FINISHED", timeout=60
        )
    if not ok:
        log.warning(
            "MLflow: not everything was delivered; it is kept in %s/metrics.jsonl", tracker.run_dir
        )


def write_outputs(results: dict, args, loaded) -> Path:
    """JSON file, PNG plots and MLflow logging (rank 0). Returns the JSON path."""

    ckpt = Path(loaded.meta.get("checkpoint") or args.target)
    base = loaded.run_dir or ckpt.resolve().parent
    json_path = Path(args.json) if args.json else default_json_path(results, base)
    out_dir = Path(args.out_dir) if args.out_dir else base / "eval"
    pngs = make_plots(results, out_dir, loaded.run_dir)
    publish(results, json_path, pngs, loaded, args, eval_metrics)
    print(f"\nresults: {json_path}\nplots:   {out_dir}")
    if results["mlflow_run_id"]:
        print(f"MLflow:  run {results['mlflow_run_id']}")
    return json_path


def publish(results: dict, json_path: Path, pngs: list[Path], loaded, args, metrics_of) -> None:
    """Record the plots in `results`, write it to `json_path`, and (unless --no-mlflow) log
    `metrics_of(results)` ([(metrics, step)]) and the files to the run's MLflow run."""
    from pipeline.common.atomic import atomic_write_json

    results["plots"] = [str(p) for p in pngs]
    tracker, prev_status = (
        (None, None)
        if args.no_mlflow
        else open_tracker(loaded.run_dir, args.tracking_uri, loaded.cfg, args.target)
    )
    results["mlflow_run_id"] = tracker.run_id if tracker else None
    atomic_write_json(json_path, results)
    if tracker is not None:
        for metrics, step in metrics_of(results):
            tracker.log_metrics(metrics, step)
        for path in [json_path, *pngs]:
            tracker.log_artifact(path, "eval")
        finish_tracker(tracker, prev_status)
