"""Process exit codes with a meaning for launchers (the Slurm job script and the local launcher
read them), and the record rank 0 leaves of how a run ended.

    write_exit(run_dir, REQUEUE, step)        # training, rank 0, last thing before exiting
    recorded_exit(run_dir, since=t0)          # a launcher whose workers were signalled
"""

from __future__ import annotations

import json
import time
from pathlib import Path

OK = 0
USER_ERROR = 2  # bad config / input: do not retry
REQUEUE = 85  # stopped on a preemption/time-limit signal after writing a checkpoint: requeue
NONFINITE_ABORT = 86  # too many non-finite steps in a row; last good state checkpointed
PEER_FAILED = 3  # this rank stopped because another rank of the run failed (see its error)

EXIT_FILE = "last_exit.json"  # under <run_dir>/logs/


def write_exit(run_dir: Path, code: int, step: int) -> None:
    """Record how this run ended (rank 0): a launcher that was itself signalled reads it."""
    from pipeline.common.atomic import atomic_write_json

    record = {"code": code, "step": step, "time": time.time()}
    atomic_write_json(Path(run_dir) / "logs" / EXIT_FILE, record)


def recorded_exit(run_dir: Path, since: float) -> int | None:
    """The exit code written by write_exit at or after `since` (None when there is none)."""
    path = Path(run_dir) / "logs" / EXIT_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return int(data["code"]) if data.get("time", 0) >= since else None


def exit_code_for(error: BaseException) -> int:
    """The exit code a process ends with for `error`: 2 for user-facing errors, 1 for bugs."""
    from pipeline.common.errors import RdptError

    return USER_ERROR if isinstance(error, RdptError) else 1
