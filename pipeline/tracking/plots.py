"""Small matplotlib (Agg) plots shared by evaluation and run comparison; each writes one PNG
(written under a temporary name and renamed) and returns its path.

Every PNG carries what it draws as a text chunk `rdpt:drawn` (JSON, read back from the
figure's artists when it is saved: per panel its title, its lines' labels and points, its bars'
heights, its legend's texts), so a reader or a test can check a plot's content without looking
at pixels: `drawn(path)`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.common.atomic import atomic_open

Series = Mapping[int, float] | Sequence[Mapping[str, float]]


def _figure(ncols: int = 1, nrows: int = 1, size=(6.4, 4.2)):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)


def _save(fig, path: str | os.PathLike) -> Path:
    import json

    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    content = json.dumps([_drawn_in(ax) for ax in fig.axes])
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, metadata={DRAWN_KEY: content})
    plt.close(fig)
    return path


DRAWN_KEY = "rdpt:drawn"


def _drawn_in(ax) -> dict:
    lines = [
        {
            "label": ln.get_label(),
            "x": [float(v) for v in ln.get_xdata()],
            "y": [float(v) for v in ln.get_ydata()],
        }
        for ln in ax.get_lines()
    ]
    bars = [float(p.get_height()) for p in ax.patches]
    legend = ax.get_legend()
    texts = [t.get_text() for t in legend.get_texts()] if legend is not None else []
    return {"title": ax.get_title(), "lines": lines, "bars": bars, "legend": texts}


def drawn(path: str | os.PathLike) -> list[dict]:
    """What the PNG at `path` (written by this module) draws, panel by panel."""
    import json

    from PIL import Image

    with Image.open(path) as img:
        return json.loads(img.text[DRAWN_KEY])


def _as_points(series) -> tuple[list[float], list[float]]:
    """{r: loss} or [{"r": .., "loss": ..}] -> sorted (xs, ys)."""
    if isinstance(series, Mapping):
        pts = sorted((float(k), float(v)) for k, v in series.items())
    else:
        pts = sorted((float(d["r"]), float(d["loss"])) for d in series)
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_loss_vs_r(results, path: str | os.PathLike, title: str = "loss against depth") -> Path:
    """Loss against the number of recurrences r (log2 x axis).

    `results`: `{r: loss}`, a list of `{"r": r, "loss": loss}` dicts, or several such series
    by label (`{"run-a": {1: 5.1, 8: 4.2}, "run-b": {...}}`).
    """
    fig, axes = _figure()
    ax = axes[0][0]
    first = next(iter(results.values()), None) if isinstance(results, Mapping) else None
    by_label = results if isinstance(first, (Mapping, list, tuple)) else {None: results}
    for label, series in by_label.items():
        xs, ys = _as_points(series)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("recurrences r")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if any(label is not None for label in by_label):
        ax.legend()
    return _save(fig, path)


def plot_exit_histogram(hist, path: str | os.PathLike, title: str = "adaptive exit depth") -> Path:
    """Bar chart of how many tokens exited at each depth.

    `hist`: `{depth: count}`, or a sequence of counts for depths 1, 2, 3, ...
    """
    if not isinstance(hist, Mapping):
        hist = {i + 1: c for i, c in enumerate(hist)}
    depths = sorted(hist)
    counts = [hist[d] for d in depths]
    total = sum(counts)
    fig, axes = _figure()
    ax = axes[0][0]
    ax.bar(depths, counts, width=0.8, color="tab:blue")
    if total:
        mean = sum(d * c for d, c in zip(depths, counts)) / total
        ax.axvline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.2f}")
        ax.legend()
    ax.set_xlabel("exit depth (iterations)")
    ax.set_ylabel("tokens")
    ax.set_title(f"{title} ({total} tokens)")
    return _save(fig, path)


def plot_exit_histograms(
    hists: Mapping[str, Mapping[int, int]], max_r: int, path: str | os.PathLike, title: str
) -> Path:
    """Exit-depth histograms of several conditions side by side in one panel, each bar series
    labelled with its mean depth. `hists`: {label: {depth: tokens}}; every series draws one bar
    per depth 1..max_r (zero where no token exited), in the order given."""
    fig, axes = _figure()
    ax = axes[0][0]
    n = max(len(hists), 1)
    width = 0.8 / n
    for k, (label, hist) in enumerate(hists.items()):
        counts = [int(hist.get(d, 0)) for d in range(1, max_r + 1)]
        total = sum(counts)
        mean = sum(d * c for d, c in zip(range(1, max_r + 1), counts)) / total if total else 0.0
        xs = [d - 0.4 + width * (k + 0.5) for d in range(1, max_r + 1)]
        ax.bar(xs, counts, width=width, label=f"{label}: mean depth {mean:.2f} ({total} tokens)")
    ax.legend()
    ax.set_xlabel("exit depth (iterations)")
    ax.set_ylabel("tokens")
    ax.set_title(title)
    return _save(fig, path)


def plot_loss_vs_mean_depth(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    fixed: Mapping[int, float],
    path: str | os.PathLike,
) -> Path:
    """Loss against mean iterations per token: one line per exit criterion (one point per
    threshold, `curves`: {criterion: [(mean_depth, loss), ...]}) and the fixed-r curve
    (`fixed`: {r: loss}) as the reference every criterion should beat."""
    fig, axes = _figure()
    ax = axes[0][0]
    rs = sorted(fixed)
    ax.plot(rs, [fixed[r] for r in rs], color="black", linestyle="--", label="fixed r")
    for name, points in curves.items():
        pts = sorted((float(d), float(loss)) for d, loss in points)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("mean iterations per token")
    ax.set_ylabel("loss")
    ax.set_title("adaptive exit: loss against mean depth")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_state_convergence(curves: Mapping[str, Sequence[float]], path: str | os.PathLike) -> Path:
    """One panel per curve against iteration 1..n, e.g. `{"relative state change": [...],
    "state cosine": [...], "loss": [...]}` (a positive curve spanning >2 decades gets a log axis).
    """
    n = max(len(curves), 1)
    fig, axes = _figure(ncols=n, size=(4.6, 3.6))
    for ax, (name, ys) in zip(axes[0], curves.items()):
        ys = [float(y) for y in ys]
        ax.plot(range(1, len(ys) + 1), ys, marker=".")
        pos = [y for y in ys if y > 0]
        if pos and len(pos) == len(ys) and max(pos) / min(pos) > 100:
            ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_loss_vs_tokens(series_by_run: Mapping[str, object], path: str | os.PathLike) -> Path:
    """Training loss against tokens seen, one line per run.

    Each value is a tuple `(tokens_seq, loss_seq)` or a list of `(tokens, loss)` pairs.
    """
    fig, axes = _figure()
    ax = axes[0][0]
    for label, series in series_by_run.items():
        if isinstance(series, tuple) and len(series) == 2 and not _is_number(series[0]):
            xs, ys = list(series[0]), list(series[1])
        else:
            xs, ys = [p[0] for p in series], [p[1] for p in series]
        ax.plot(xs, ys, label=label)
    ax.set_xlabel("tokens")
    ax.set_ylabel("training loss")
    ax.set_title("loss against tokens")
    ax.grid(True, alpha=0.3)
    if series_by_run:
        ax.legend()
    return _save(fig, path)


TELEMETRY_PANELS = (
    ("telemetry/state_norm", "latent state norm"),
    ("telemetry/token_corr", "token correlation of the state"),
    ("telemetry/rel_change", "||s_r - s_r-1|| / ||s_r||"),
    ("telemetry/update_rms", "update RMS"),
)


def plot_telemetry(series_by_run: Mapping[str, Mapping[str, object]], path) -> Path:
    """Training telemetry against steps: one panel per metric of TELEMETRY_PANELS, one line per
    run. `series_by_run[label][metric]` is a list of (step, value) pairs."""
    fig, axes = _figure(ncols=2, nrows=2, size=(5.5, 3.8))
    for ax, (key, title) in zip([a for row in axes for a in row], TELEMETRY_PANELS):
        for label, by_key in series_by_run.items():
            pts = by_key.get(key) or []
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
    return _save(fig, path)


def _is_number(x) -> bool:
    return isinstance(x, (int, float))


def plot_task_accuracy(
    curves: Mapping[str, Sequence[tuple[float, float, int]]], path: str | os.PathLike
) -> Path:
    """Task exact-match accuracy against forward FLOPs per answer, one line per curve
    (`curves[label]` = [(flops, accuracy, knob)], e.g. "run-a depth"); points labelled by knob
    (r, pause or thought count)."""
    fig, axes = _figure()
    ax = axes[0][0]
    for label, pts in curves.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for x, y, knob in pts:
            ax.annotate(str(knob), (x, y), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("forward FLOPs per answer")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title("task accuracy against compute")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    return _save(fig, path)
