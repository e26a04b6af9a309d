"""The shared PNG plots (evaluation and run comparison) draw what they are given."""

from __future__ import annotations

from PIL import Image

from pipeline.tracking.plots import (
    drawn,
    plot_exit_histogram,
    plot_loss_vs_r,
    plot_loss_vs_tokens,
    plot_state_convergence,
)


def _colours(path) -> int:
    img = Image.open(path).convert("RGB")
    return len(img.getcolors(maxcolors=1 << 20) or [])


def test_plots_draw_what_they_are_given(tmp_path):
    r_png = plot_loss_vs_r({32: 3.85, 1: 5.0, 16: 3.9, 4: 4.2}, tmp_path / "r.png")
    two_png = plot_loss_vs_r(
        {"a": [{"r": 8, "loss": 4.0}, {"r": 1, "loss": 5.0}], "b": {1: 5.5, 8: 4.4}},
        tmp_path / "r2.png",
    )
    h_png = plot_exit_histogram({1: 3, 2: 10, 5: 40}, tmp_path / "h.png")
    h2_png = plot_exit_histogram([0, 4, 9, 1], tmp_path / "h2.png")
    conv = {"relative state change": [1.0, 0.1, 0.01, 1e-3], "state cosine": [0.2, 0.5, 0.8, 0.9]}
    c_png = plot_state_convergence(conv, tmp_path / "c.png")
    t_png = plot_loss_vs_tokens(
        {"run-a": ([0, 1000, 2000], [6.0, 4.0, 3.5]), "run-b": [(0, 6.2), (1000, 4.4)]},
        tmp_path / "t.png",
    )

    (panel,) = drawn(r_png)  # points sorted by r, one line
    assert [(ln["x"], ln["y"]) for ln in panel["lines"]] == [
        ([1, 4, 16, 32], [5.0, 4.2, 3.9, 3.85])
    ]
    (panel,) = drawn(two_png)
    assert {ln["label"]: (ln["x"], ln["y"]) for ln in panel["lines"]} == {
        "a": ([1, 8], [5.0, 4.0]),
        "b": ([1, 8], [5.5, 4.4]),
    }
    (panel,) = drawn(h_png)
    assert panel["bars"] == [3, 10, 40] and "53 tokens" in panel["title"]
    mean = (1 * 3 + 2 * 10 + 5 * 40) / 53
    assert [ln["x"] for ln in panel["lines"]] == [[mean, mean]]  # the mean depth marker
    (panel,) = drawn(h2_png)
    assert panel["bars"] == [0, 4, 9, 1]
    panels = drawn(c_png)
    assert [(p["title"], p["lines"][0]["y"]) for p in panels] == list(conv.items())
    assert all(p["lines"][0]["x"] == [1, 2, 3, 4] for p in panels)
    (panel,) = drawn(t_png)
    assert {ln["label"]: (ln["x"], ln["y"]) for ln in panel["lines"]} == {
        "run-a": ([0, 1000, 2000], [6.0, 4.0, 3.5]),
        "run-b": ([0, 1000], [6.2, 4.4]),
    }
    for p in (r_png, two_png, h_png, h2_png, c_png, t_png):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert _colours(p) > 20, f"{p.name} has no rendered content"
    assert not list(tmp_path.glob(".tmp-*"))  # written under a temporary name, renamed
