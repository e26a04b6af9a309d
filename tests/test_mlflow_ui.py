"""The MLflow UI page of a run logged by RunTracker renders in headless Chromium."""

from __future__ import annotations

import urllib.request

from PIL import Image

from pipeline.tracking.logger import RunTracker

from fixtures_mlflow import run_chromium


def test_run_page_renders_in_headless_chromium(mlflow_server, chromium, tmp_path, experiment_name):
    run_name = f"ui-render-{experiment_name}"
    tracker = RunTracker(
        tmp_path / "run", mlflow_server.url, experiment_name, run_name, system_metrics_interval=0
    )
    run_id = tracker.ensure_run()
    tracker.log_params({"model.hidden_size": 128})
    for step in range(10):
        tracker.log_metrics({"train/loss": 5.0 - 0.3 * step}, step=step)
    assert tracker.close()

    url = f"{mlflow_server.url}/#/experiments/{tracker.experiment_id}/runs/{run_id}"
    shot = tmp_path / "run-page.png"
    proc = run_chromium(
        chromium,
        url,
        tmp_path,
        "--virtual-time-budget=15000",
        "--window-size=1280,900",
        f"--screenshot={shot}",
        "--dump-dom",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    # The run name and id only reach the page through the UI's own API calls (the served
    # index.html is a static shell), so their presence means the React app rendered the run.
    assert run_name in dom, f"run name not in the rendered DOM ({len(dom)} chars)"
    assert run_id in dom
    with urllib.request.urlopen(mlflow_server.url + "/", timeout=10) as r:
        assert run_name not in r.read().decode(errors="replace")

    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 900)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "screenshot is (nearly) a single colour"
    dominant = max(c for c, _ in colours)
    assert dominant < 0.95 * img.size[0] * img.size[1], "screenshot is mostly blank"
