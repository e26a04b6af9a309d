"""One run at a time per run directory: an exclusive lock file that works on NFS and Lustre.

    lock = RunLock(run_dir)
    lock.acquire()          # RdptRunLockError naming the holder when another run has it
    ...
    lock.release()

The lock is `<run_dir>/.rdpt.lock`, created with O_CREAT | O_EXCL (atomic on local file
systems, NFSv3+ and Lustre), holding the holder's host, pid, Slurm job id and start time. While
held, a daemon thread touches it every `heartbeat_s` seconds. A lock is stale, and is taken
over (with a warning), when its holder
- ran on this host and its pid is gone,
- was an earlier run of this very Slurm job (a requeued job keeps its id; Slurm requeues only
  after every task of the previous run ended), or
- has not touched the lock for `stale_after_s` seconds (a crashed node).
Taking over renames the stale file first (only one of several contenders can), then creates a
fresh one with O_EXCL, so two processes never both believe they hold the lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from pipeline.common.errors import RdptError

LOCK_NAME = ".rdpt.lock"
log = logging.getLogger("rdpt.lock")


class RdptRunLockError(RdptError):
    """Another live run holds the run directory."""


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "started": time.time(),
        "token": uuid.uuid4().hex,
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The exclusive lock of one run directory (see the module docstring)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        heartbeat_s: float = 30.0,
        stale_after_s: float = 600.0,
        also_mine: tuple[int, ...] = (),
    ):
        self.path = Path(run_dir) / LOCK_NAME
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        # pids whose lock counts as ours: this process, and the `rdpt train` that started it
        self.also_mine = {os.getpid(), int(os.environ.get("RDPT_LAUNCHER_PID", "0")), *also_mine}
        self.held: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        """The lock's content, or None when nobody holds it."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            data = {}  # half-written by a holder that died at once: judged by its age
        data["age_s"] = time.time() - self._mtime()
        return data

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return time.time()

    def stale_reason(self, holder: dict) -> str | None:
        """Why `holder` no longer runs (None: it may well be alive)."""
        me = _me()
        if holder.get("host") == me["host"] and holder.get("pid"):
            if not _pid_alive(int(holder["pid"])):
                return f"its process {holder['pid']} on this host is gone"
        job = holder.get("slurm_job_id")
        if job and job == me["slurm_job_id"] and holder.get("pid") != me["pid"]:
            return f"it was an earlier run of this Slurm job ({job}, requeued)"
        if holder.get("age_s", 0.0) > self.stale_after_s:
            return f"it has not been refreshed for {holder['age_s']:.0f} s"
        return None

    def acquire(self) -> None:
        """Take the lock, or raise RdptRunLockError naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            me = _me()
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # released meanwhile: try again
                if holder.get("host") == me["host"] and holder.get("pid") in self.also_mine:
                    self.held = None  # our launcher holds it for us
                    return
                reason = self.stale_reason(holder)
                if reason is None:
                    raise RdptRunLockError(self._busy_message(holder)) from None
                self._take_over(holder, reason)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = me
            self._start_heartbeat()
            return
        raise RdptRunLockError(f"{self.path}: could not take the lock (contended); try again")

    def _take_over(self, holder: dict, reason: str) -> None:
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)  # only one contender can move the stale lock away
        except FileNotFoundError:
            return
        aside.unlink(missing_ok=True)
        log.warning(
            "took over the lock of %s from %s pid %s: %s",
            self.path.parent,
            holder.get("host"),
            holder.get("pid"),
            reason,
        )

    def _busy_message(self, holder: dict) -> str:
        job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        return (
            f"run directory {self.path.parent} is in use by another run: host "
            f"{holder.get('host')}, pid {holder.get('pid')}{job}, since {since} (lock refreshed "
            f"{holder.get('age_s', 0):.0f} s ago). Wait for it or stop it, or train into another "
            f"directory (run.name=... / run.dir=...). If that run is dead and the lock is not "
            f"released within {self.stale_after_s:.0f} s, remove {self.path}."
        )

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._thread = threading.Thread(target=beat, name="rdpt-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Remove the lock if this process still holds it."""
        if self.held is None:
            return
        self._stop.set()
        holder = self.holder()
        if holder is not None and holder.get("token") == self.held["token"]:
            self.path.unlink(missing_ok=True)
        self.held = None
