"""`RunTracker`: one training/evaluation run's link to MLflow that never slows or stops training.

    tracker = RunTracker(run_dir, "http://127.0.0.1:5000", "rdpt", "tiny")
    tracker.ensure_run()
    tracker.log_params(flatten(cfg)); tracker.set_tags({...})
    tracker.log_metrics({"train/loss": 2.3}, step=10)        # microseconds
    tracker.log_checkpoint_reference(ckpt_dir, step=10, sha256=...)
    tracker.close("FINISHED")

It composes small parts behind one sink interface (sink.py):
- journal.py: `metrics.jsonl` in the run directory gets every logged step, always (also with
  `enabled=False` or no tracking URI);
- mlflow_sender.py: a background thread delivers everything to MLflow in order, buffers while
  the server is down and replays on a continued run what never arrived (exactly once);
- system_metrics.py: `system/*` samples (CPU, RAM, GPU) every `system_metrics_interval` s;
- checkpoint_refs.py: checkpoint references (a JSON artifact + tags; small ones uploaded).

Only rank 0 of a distributed job should create a RunTracker.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.tracking.checkpoint_refs import REFS_DIR, log_checkpoint_reference
from pipeline.tracking.credentials import take_credentials
from pipeline.tracking.journal import (
    DELIVERED_FILE,
    METRICS_FILE,
    PENDING_FILE,
    RUN_FILE,
    MetricsJournal,
)
from pipeline.tracking.mlflow_sender import STATUSES, MlflowSender, valid_name
from pipeline.tracking.system_metrics import SystemMetricsSampler

log = logging.getLogger(__name__)

__all__ = ["DELIVERED_FILE", "METRICS_FILE", "REFS_DIR", "RUN_FILE", "RunTracker", "valid_name"]
_RESERVED = ("step", "timestamp")


def undelivered_message(run_dir: Path, uri: str | None, pending: dict) -> str:
    """What a closing tracker could not deliver, where it is kept and how to deliver it."""
    steps = pending.get("steps") or []
    span = f" (steps {steps[0]}-{steps[-1]})" if steps else ""
    other = pending.get("other") or []
    return (
        f"MLflow at {uri} did not receive {pending.get('metric_lines', 0)} metric lines{span}"
        f" and {len(other)} other records ({', '.join(sorted(set(other))) or 'none'}); they are "
        f"kept in {run_dir} ({METRICS_FILE}, {PENDING_FILE}). Deliver them with "
        f"`rdpt runs sync {run_dir}` once the server answers (a resumed run or `rdpt eval` of "
        f"this run does it too)."
    )


class RunTracker:
    """Non-blocking MLflow logging for one run directory (see the module docstring).

    Args:
        run_dir: the run directory; metrics.jsonl, mlflow_run.json live there.
        tracking_uri: server URL (http://127.0.0.1:5000) or `sqlite:///path.db`; None reads
            MLFLOW_TRACKING_URI; with neither, only metrics.jsonl is written.
        experiment: MLflow experiment name (created if missing).
        run_name: MLflow run name for a new run.
        enabled: False writes metrics.jsonl only.
        system_metrics_interval: seconds between `system/*` samples; 0 or None disables.
        flush_interval: seconds between background sends.
        checkpoint_artifact_max_bytes: checkpoints up to this size are uploaded as artifacts by
            `log_checkpoint_reference`; larger ones are only referenced.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        tracking_uri: str | None = None,
        experiment: str = "rdpt",
        run_name: str | None = None,
        enabled: bool = True,
        *,
        system_metrics_interval: float | None = 30.0,
        flush_interval: float = 1.0,
        checkpoint_artifact_max_bytes: int = 64 << 20,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # user:password@ in the URI goes to MLflow's auth variables; only the bare URI is kept
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        self.tracking_uri = take_credentials(uri)
        self.experiment = experiment
        self.run_name = run_name or self.run_dir.name
        self.enabled = bool(enabled and self.tracking_uri)
        if enabled and not self.tracking_uri:
            log.warning(
                "no tracking URI (argument or MLFLOW_TRACKING_URI): metrics go to %s only",
                self.run_dir / METRICS_FILE,
            )
        self.checkpoint_artifact_max_bytes = checkpoint_artifact_max_bytes
        self._lock = threading.Lock()
        self._closed = False
        self.journal = MetricsJournal(self.run_dir)
        self.mlflow: MlflowSender | None = None
        self.sampler: SystemMetricsSampler | None = None
        if self.enabled:
            self.mlflow = MlflowSender(
                self.run_dir,
                self.tracking_uri,
                experiment,
                self.run_name,
                self.journal,
                flush_interval=flush_interval,
            )
            if system_metrics_interval:
                self.sampler = SystemMetricsSampler(self.mlflow, system_metrics_interval)
            atexit.register(self._flush_at_exit)

    # ---------------------------------------------------------------- public API

    @property
    def run_id(self) -> str | None:
        return self.mlflow.run_id if self.mlflow else None

    @property
    def experiment_id(self) -> str | None:
        return self.mlflow.experiment_id if self.mlflow else None

    @property
    def stats(self) -> dict:
        return self.mlflow.stats if self.mlflow else {}

    def ensure_run(self) -> str | None:
        """Create the MLflow run, or continue the one recorded in run_dir/mlflow_run.json.

        Returns the run id, or None when tracking is disabled or the server cannot be reached
        now (the background thread then creates/continues the run when it is back).
        """
        return self.mlflow.ensure_run() if self.mlflow else None

    def log_params(self, flat: Mapping[str, Any]) -> None:
        """Queue params (a flat dict, e.g. `config_io.flatten(cfg)`).

        Values are stringified (JSON for lists/dicts) and cut to MLflow's 6000 characters;
        keys with characters MLflow refuses get `_` instead. On a continued run, a param whose
        value changed is not re-logged (MLflow forbids it) but recorded as tag
        `rdpt.param_changed.<key>` with the new value.
        """
        if self.mlflow:
            self.mlflow.log_params(flat)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Queue tags (values stringified, cut to 8000 characters)."""
        if self.mlflow:
            self.mlflow.set_tags(tags)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record `metrics` at `step`: one line in metrics.jsonl now, MLflow in the background.

        Values may be Python numbers, numpy or 0-d torch scalars. Names must be valid MLflow
        names (`train/loss`); an invalid name raises ValueError at once.
        """
        ts = int(time.time() * 1000)
        step = int(step)
        values = {}
        for k, v in metrics.items():
            if k in _RESERVED or not valid_name(k):
                raise ValueError(f"invalid metric name {k!r}: use letters, digits, _ - . / :")
            values[k] = float(v)
        with self._lock:
            if self._closed:
                raise RuntimeError("RunTracker.log_metrics after close()")
            end = self.journal.append(step, ts, values)
            if self.mlflow:
                self.mlflow.log_metrics(values, step, timestamp_ms=ts, journal_offset=end)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Queue the upload of a file or directory (it must still exist at the next send)."""
        if self.mlflow:
            self.mlflow.log_artifact(path, artifact_path)

    def log_checkpoint_reference(
        self,
        path: str | os.PathLike,
        step: int,
        size: int | None = None,
        sha256: str | None = None,
    ) -> None:
        """Record a checkpoint: a JSON reference artifact `checkpoints/step-XXXXXXXX.json`
        (path, host, step, size, sha256) and tags `checkpoint.latest.*`; the checkpoint itself
        is uploaded under `checkpoints/step-XXXXXXXX/` when `size` <= checkpoint_artifact_max_bytes.
        """
        log_checkpoint_reference(
            self,
            self.run_dir,
            path,
            step,
            size=size,
            sha256=sha256,
            max_upload_bytes=self.checkpoint_artifact_max_bytes,
        )

    def flush(self, timeout: float = 30.0, down_grace: float | None = None) -> bool:
        """Wait until everything queued reached MLflow; False on timeout (nothing is lost:
        it stays queued, and in metrics.jsonl).

        `down_grace`: give up earlier, once the server has been unreachable for that many
        seconds during this call (None: wait for the whole timeout).
        """
        return self.mlflow.flush(timeout, down_grace) if self.mlflow else True

    def close(
        self, status: str = "FINISHED", timeout: float = 30.0, down_grace: float = 5.0
    ) -> bool:
        """Mark the run `status` (FINISHED, FAILED, KILLED), flush, stop the threads.

        Waits up to `timeout` s while the server answers, but only `down_grace` s once it is
        unreachable (a preempted job must not spend its grace period on a dead server).
        Returns False when something was not delivered; it is in metrics.jsonl and a tracker
        on the same run dir (the resumed job) replays it.
        """
        if self._closed:
            return True
        if status not in STATUSES:
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, not {status!r}")
        ok, pending = True, {}
        if self.sampler:
            self.sampler.stop()
        if self.mlflow:
            ok, pending = self.mlflow.close(status, timeout, down_grace)
        with self._lock:
            self._closed = True
            self.journal.close()
        if not ok:
            log.warning("%s", undelivered_message(self.run_dir, self.tracking_uri, pending))
        return ok

    def __enter__(self) -> RunTracker:
        self.ensure_run()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def _flush_at_exit(self) -> None:
        # A process that never called close(): deliver what we can; the rest is replayed later.
        if not self._closed:
            self.flush(timeout=10.0)

    @property
    def pending(self) -> int:
        """Number of queued operations not yet delivered."""
        return self.mlflow.pending if self.mlflow else 0
