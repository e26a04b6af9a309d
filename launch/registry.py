"""The project's record of submitted jobs: `.rdpt/jobs.jsonl`, one JSON object per line.

`rdpt submit` appends one record per Slurm job (a chain gives K records, a prep submission two);
`rdpt jobs` reads them and asks Slurm for their state. Records are only appended (one
`write` of one line with O_APPEND), so concurrent submits from one project do not clobber each
other; a cancel appends a `{"job_id": ..., "cancelled_at": ...}` record. The file is private
to its user (0600; its directory 0700): it lists run directories and commands.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

REGISTRY_ENV_VAR = "RDPT_JOBS_FILE"
DEFAULT_REGISTRY = Path(".rdpt") / "jobs.jsonl"


def registry_path() -> Path:
    return Path(os.environ.get(REGISTRY_ENV_VAR) or DEFAULT_REGISTRY)


def append(record: dict[str, Any], path: Path | None = None) -> None:
    """Append one record (gets `recorded_at`, UTC ISO time)."""
    path = path or registry_path()
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    record = {**record, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also a registry created before it was made private
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path | None = None) -> list[dict[str, Any]]:
    """Submitted jobs in submission order, each merged with later records of the same job id."""
    path = path or registry_path()
    if not path.is_file():
        return []
    jobs: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a torn last line after a crash: skip it, say so
            print(f"warning: {path}:{n}: not valid JSON, skipped")
            continue
        job_id = int(rec["job_id"])
        jobs.setdefault(job_id, {}).update(rec)
    return list(jobs.values())


def find(job_id: int, path: Path | None = None) -> dict[str, Any] | None:
    for rec in read(path):
        if int(rec["job_id"]) == job_id:
            return rec
    return None
