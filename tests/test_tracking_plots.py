"""The shared PNG plots (evaluation and run comparison) draw what they are given."""

from __future__ import annotations

from PIL import Image

from pipeline.tracking.plots import (
    plot_exit_histogram,
    plot_loss_vs_r,
    plot_loss_vs_tokens,
    plot_state_convergence,
)


def _colours(path) -> int:
    img = Image.open(path).convert("RGB")
    return len(img.getcolors(maxcolors=1 << 20) or [])


def test_plots_write_nonblank_pngs(tmp_path):
    paths = [
        plot_loss_vs_r({1: 5.0, 4: 4.2, 16: 3.9, 32: 3.85}, tmp_path / "r.png"),
        plot_loss_vs_r(
            {"a": [{"r": 1, "loss": 5.0}, {"r": 8, "loss": 4.0}], "b": {1: 5.5, 8: 4.4}},
            tmp_path / "r2.png",
        ),
        plot_exit_histogram({1: 3, 2: 10, 5: 40}, tmp_path / "h.png"),
        plot_exit_histogram([0, 4, 9, 1], tmp_path / "h2.png"),
        plot_state_convergence(
            {
                "relative state change": [1.0, 0.1, 0.01, 1e-3, 1e-4],
                "state cosine": [0.2, 0.5, 0.8, 0.9, 0.95],
            },
            tmp_path / "c.png",
        ),
        plot_loss_vs_tokens(
            {
                "run-a": ([0, 1000, 2000], [6.0, 4.0, 3.5]),
                "run-b": [(0, 6.2), (1000, 4.4), (2000, 3.9)],
            },
            tmp_path / "t.png",
        ),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert _colours(p) > 20, f"{p.name} looks blank"
    assert not list(tmp_path.glob(".tmp-*"))  # written under a temporary name, renamed
