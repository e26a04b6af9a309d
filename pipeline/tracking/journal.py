"""metrics.jsonl: every logged step of a run, on the run's own disk, whatever MLflow does.

    journal = MetricsJournal(run_dir)          # appends to run_dir/metrics.jsonl
    end = journal.append(step, timestamp_ms, {"train/loss": 2.3})   # byte offset after the line
    for op in journal.read_ops(start, journal.replay_end): ...      # lines written before now
    DeliveryRecord(run_dir).offset_for(run_id)  # how far an MLflow run got (mlflow_delivered.json)

One JSON object per line: {"step", "timestamp", name: value, ...}. A line cut short by a crash
is kept on a line of its own (readers skip it) so the next record is never glued to it.
Delivery to MLflow is tracked as a byte offset into this file, so a later tracker on the same
run directory (a resumed job, `rdpt runs sync`) sends exactly the lines that never arrived.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from pipeline.common.atomic import atomic_write_json
from pipeline.common.errors import RdptDiskFullError, is_disk_full
from pipeline.tracking.sink import Op

log = logging.getLogger("pipeline.tracking")

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "mlflow_run.json"
DELIVERED_FILE = "mlflow_delivered.json"
PENDING_FILE = "mlflow_pending.json"  # params, tags, artifacts, status MLflow never received
METRIC_KINDS = ("metrics", "system")  # metrics are replayed from the journal, system dropped


class MetricsJournal:
    """Appends metric lines to run_dir/metrics.jsonl (not thread-safe: the caller locks)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / METRICS_FILE
        self._file = open(self.path, "ab")
        if self._file.tell() and not _ends_with_newline(self.path):
            # NOTE: a crash mid-line left a partial record; keep it on its own (unreadable)
            # line instead of gluing the next record to it.
            self._file.write(b"\n")
            self._file.flush()
        self.replay_end = self._file.tell()
        """Bytes written before this journal was opened: lines a new tracker may replay."""

    def append(self, step: int, timestamp_ms: int, values: Mapping[str, float]) -> int:
        """Write one line (flushed); returns the byte offset just after it."""
        line = json.dumps({"step": step, "timestamp": timestamp_ms, **values}) + "\n"
        try:
            self._file.write(line.encode())
            self._file.flush()
        except OSError as e:
            if not is_disk_full(e):
                raise
            raise RdptDiskFullError(
                f"metrics journal {self.path}: no space left on device at step {step}; the "
                f"lines before it are intact (free space, then resume the run)"
            ) from e
        return self._file.tell()

    @property
    def size(self) -> int:
        return self._file.tell() if not self._file.closed else self.path.stat().st_size

    def read_ops(self, start: int, end: int) -> Iterator[Op]:
        """The lines in bytes [start, end) as `metrics` ops, unreadable lines skipped."""
        yield from read_metric_ops(self.path, start, end)

    def close(self) -> None:
        self._file.close()


def read_metric_ops(path: Path, start: int, end: int) -> Iterator[Op]:
    """Lines of a metrics.jsonl in bytes [start, end) as `metrics` ops (with end offsets)."""
    if end <= start:
        return
    with open(path, "rb") as f:
        f.seek(start)
        offset = start
        for raw in f.read(end - start).splitlines(keepends=True):
            offset += len(raw)
            try:
                rec = json.loads(raw)
                step, ts = int(rec.pop("step")), int(rec.pop("timestamp"))
                items = [(k, float(v), ts, step) for k, v in rec.items()]
            except (ValueError, KeyError, TypeError):
                log.warning("skipping unreadable line at byte %d of %s", offset - len(raw), path)
                continue
            yield Op("metrics", items, offset)


class DeliveryRecord:
    """mlflow_run.json (which MLflow run this run directory logs to) and mlflow_delivered.json
    (how far into metrics.jsonl that run has received every line)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)

    def run(self) -> dict:
        return read_json(self.run_dir / RUN_FILE)

    def save_run(self, info: dict) -> None:
        atomic_write_json(self.run_dir / RUN_FILE, info)

    def offset_for(self, run_id: str) -> int:
        """Bytes of metrics.jsonl delivered to `run_id` (0 when another run or none)."""
        saved = read_json(self.run_dir / DELIVERED_FILE)
        return int(saved.get("offset", 0)) if saved.get("run_id") == run_id else 0

    def save_offset(self, run_id: str, offset: int) -> None:
        atomic_write_json(self.run_dir / DELIVERED_FILE, {"run_id": run_id, "offset": offset})

    def pending_ops(self) -> list[Op]:
        """The non-metric records a closed tracker could not deliver (metrics are in the
        journal); the next tracker on this run directory sends them first."""
        saved = read_json(self.run_dir / PENDING_FILE)
        ops = []
        for rec in saved.get("ops", []):
            payload = rec["payload"]
            ops.append(Op(rec["kind"], tuple(payload) if rec["kind"] == "artifact" else payload))
        return ops

    def save_pending(self, ops: list[Op]) -> None:
        """Record undelivered params/tags/artifacts/status ([] removes the record)."""
        path = self.run_dir / PENDING_FILE
        keep = [
            {"kind": op.kind, "payload": op.payload} for op in ops if op.kind not in METRIC_KINDS
        ]
        if keep:
            atomic_write_json(path, {"ops": keep})
        elif path.exists():
            path.unlink()


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
