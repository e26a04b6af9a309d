"""Real MLflow tracking servers on 127.0.0.1 (sqlite + local artifacts) for tests, and a
headless Chromium for rendering the MLflow UI.

- `mlflow_server` (session): one shared server; use a unique experiment name per test.
- `mlflow_server_factory`: `factory(root=None, port=None) -> ServerHandle` for tests that stop
  and restart their own server; `factory(root=h.root, port=h.port)` after `h.stop()` restarts
  the same store on the same URL. Every server it started is stopped at teardown.
- `chromium`: path of Debian's chromium, installed with apt-get on first use (one-time cost).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from apt_packages import apt_install

from pipeline.tracking.server import ServerHandle, start_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> ServerHandle:
    handle = start_server(tmp_path_factory.mktemp("mlflow-session"))
    yield handle
    handle.stop()


@pytest.fixture
def mlflow_server_factory(tmp_path_factory):
    handles: list[ServerHandle] = []

    def factory(root: str | os.PathLike | None = None, port: int | None = None) -> ServerHandle:
        root = Path(root) if root else tmp_path_factory.mktemp("mlflow-own")
        handle = start_server(root, port=port)
        handles.append(handle)
        return handle

    yield factory
    for h in handles:
        h.stop()


@pytest.fixture
def experiment_name() -> str:
    """A fresh experiment name, so tests sharing the session server do not see each other."""
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; apt-get installs it when missing (needs root and the apt mirror)."""
    path = shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    if path is None:
        apt_install("chromium", "fonts-dejavu-core", options=("--no-install-recommends",))
        path = CHROMIUM
    assert os.access(path, os.X_OK), f"{path} is not executable"
    return path


def run_chromium(chromium: str, url: str, tmp_dir: Path, *args: str, timeout: float = 900):
    """Run headless chromium on `url` with the standard flags; returns the CompletedProcess.
    The timeout is a hang guard only: at load 5 on 2 cores one render took over 120 s."""
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_dir / 'profile'}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_dir)
