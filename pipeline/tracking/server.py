"""A local MLflow tracking server: sqlite backend + local artifact store, bound to 127.0.0.1.

`start_server(root)` runs `mlflow server` as a child process in its own session (so `stop()`
ends uvicorn's workers too), waits until `GET /health` answers and returns a `ServerHandle`.
Layout of `root`: `mlflow.db` (runs), `artifacts/` (artifact store), `server.log`.

Start-up cost, measured on 2 busy cores: ~5 s. Two defaults of `mlflow server` cost more than
the database migration: 4 uvicorn workers (each imports mlflow) and the job-execution runner
(7 extra `huey` processes); we run 1 worker and disable job execution (not used by tracking).
A fresh database is migrated once (~1 s here, much more on slow disks) and kept as a template
under the cache directory, so later servers start from a copy of an already-migrated file.

`rdpt mlflow-server start|stop|status` (pipeline/cli/runs.py) keeps a detached server per
root with `server.pid` and `server.url` next to the database.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

from pipeline.common.atomic import atomic_copy, atomic_write_text
from pipeline.common.distributed import free_port
from pipeline.common.errors import RdptError

DB_NAME = "mlflow.db"
LOG_NAME = "server.log"
PID_NAME = "server.pid"
URL_NAME = "server.url"
START_TIMEOUT_S = 180.0
SERVER_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # NOTE: job execution starts 7 `huey` consumer processes that tracking never uses.
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "PYTHONUNBUFFERED": "1",
}


class RdptTrackingError(RdptError):
    """The tracking server could not be started, reached or stopped."""


@dataclasses.dataclass
class ServerHandle:
    """A running MLflow server. `stop()` ends it (idempotent)."""

    url: str
    pid: int
    root: Path
    port: int
    log_path: Path
    proc: subprocess.Popen | None = dataclasses.field(default=None, repr=False)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after `timeout` seconds."""
        stop_process_group(self.pid, timeout, self.proc)

    def alive(self) -> bool:
        return process_alive(self.pid, self.proc)


def cache_dir() -> Path:
    base = os.environ.get("RDPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rdpt"
    )
    return Path(base)


def template_db_path() -> Path:
    """Where the migrated empty database for this MLflow version is kept."""
    return cache_dir() / f"mlflow-{metadata.version('mlflow')}-template.db"


def health_ok(url: str, timeout: float = 2.0) -> bool:
    """True when `url/health` answers 200."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def process_alive(pid: int, proc: subprocess.Popen | None = None) -> bool:
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not reaped by its parent) counts as dead.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def stop_process_group(pid: int, timeout: float = 20.0, proc=None) -> None:
    """End a server started by `start_server` (it leads its own process group)."""
    if not process_alive(pid, proc):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process_alive(pid, proc):
        time.sleep(0.05)
    if process_alive(pid, proc):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        if proc is not None:
            proc.wait(timeout=10)
    # The workers are in the same group; make sure none is left holding the port.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _mlflow_executable() -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-m", "mlflow"]


def _save_template(db: Path) -> None:
    """Copy a freshly migrated database (sqlite backup API: safe while the server runs)."""
    dst = template_db_path()
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".tmp-{dst.name}.{os.getpid()}")
    src_conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        dst_conn = sqlite3.connect(tmp)
        with dst_conn:
            src_conn.backup(dst_conn)
        dst_conn.close()
        os.replace(tmp, dst)
    finally:
        src_conn.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def start_server(
    root_dir: str | os.PathLike,
    port: int | None = None,
    host: str = "127.0.0.1",
    workers: int = 1,
    timeout: float = START_TIMEOUT_S,
) -> ServerHandle:
    """Start `mlflow server` on `host:port` over `root_dir` and wait until it answers.

    `port=None` picks a free port. Restarting on the same root and port continues the same
    database. Raises RdptTrackingError (with the tail of `server.log`) if it does not come up.
    """
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise RdptTrackingError(f"refusing to bind the MLflow server to {host!r}: use 127.0.0.1")
    root = Path(root_dir).resolve()
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    db = root / DB_NAME
    fresh_db = not db.exists()
    template = template_db_path()
    if fresh_db and template.is_file():
        atomic_copy(template, db)
        fresh_db = False
    attempts = 1 if port is not None else 3
    last_err = ""
    for _ in range(attempts):
        p = port if port is not None else free_port(host)
        handle, last_err = _spawn_and_wait(root, db, p, host, workers, timeout)
        if handle is not None:
            if fresh_db:
                with contextlib.suppress(OSError, sqlite3.Error):
                    _save_template(db)
            return handle
    raise RdptTrackingError(
        f"MLflow server over {root} did not start: {last_err}\n"
        f"--- tail of {root / LOG_NAME} ---\n{_tail(root / LOG_NAME)}"
    )


def _spawn_and_wait(root: Path, db: Path, port: int, host: str, workers: int, timeout: float):
    url = f"http://{host}:{port}"
    cmd = [
        *_mlflow_executable(),
        "server",
        "--backend-store-uri",
        f"sqlite:///{db}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    log_path = root / LOG_NAME
    env = {**os.environ, **SERVER_ENV}
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%F %T')} starting: {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=root,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None, f"the server process exited with code {proc.returncode}"
        if health_ok(url, timeout=1.0):
            return ServerHandle(url, proc.pid, root, port, log_path, proc), ""
        time.sleep(0.1)
    stop_process_group(proc.pid, 5.0, proc)
    return None, f"no answer from {url}/health within {timeout:.0f} s"


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# --- detached server per root, used by `rdpt mlflow-server` ---------------------------------


def running_server(root_dir: str | os.PathLike) -> tuple[int, str] | None:
    """(pid, url) of the detached server recorded in `root_dir`, if it is alive and answers."""
    root = Path(root_dir)
    try:
        pid = int((root / PID_NAME).read_text().strip())
        url = (root / URL_NAME).read_text().strip()
    except (OSError, ValueError):
        return None
    if not process_alive(pid) or not _is_mlflow_process(pid):
        return None
    return (pid, url) if health_ok(url) else None


def _is_mlflow_process(pid: int) -> bool:
    try:
        return b"mlflow" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the pid file


def start_detached(root_dir: str | os.PathLike, port: int | None = None) -> tuple[str, bool]:
    """Start a server that outlives this process; (url, started_now). Idempotent per root."""
    root = Path(root_dir).resolve()
    running = running_server(root)
    if running:
        return running[1], False
    if port is None:
        port = 5000 if _port_free(5000) else None
    handle = start_server(root, port=port)
    atomic_write_text(root / PID_NAME, f"{handle.pid}\n")
    atomic_write_text(root / URL_NAME, f"{handle.url}\n")
    return handle.url, True


def stop_detached(root_dir: str | os.PathLike) -> bool:
    """Stop the detached server of `root_dir`; False when none was running."""
    root = Path(root_dir).resolve()
    try:
        pid = int((root / PID_NAME).read_text().strip())
    except (OSError, ValueError):
        pid = None
    was_running = pid is not None and process_alive(pid) and _is_mlflow_process(pid)
    if was_running:
        stop_process_group(pid)
    for name in (PID_NAME, URL_NAME):
        with contextlib.suppress(FileNotFoundError):
            (root / name).unlink()
    return was_running


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
