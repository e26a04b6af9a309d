"""`rdpt runs sync RUN_DIR`: deliver to MLflow what a run's trackers could not.

    result = sync_run("runs/tiny")     # {"run_id", "metric_lines", "status", ...}

A tracker that closes while its server is unreachable keeps everything in the run directory:
metric lines in metrics.jsonl (with the offset MLflow has, mlflow_delivered.json) and every other
record in mlflow_pending.json. This opens a tracker on the run directory, which continues the
MLflow run in mlflow_run.json (or creates it), replays exactly what never arrived, and gives the
run its final status back: the one the closing tracker could not send, else the status the run
had, else FINISHED when the run directory holds COMPLETED and KILLED otherwise. Delivering twice
is harmless: a second sync finds nothing left. Any later tracker on the same run directory (a
resumed run, `rdpt eval` of the run) does the same replay.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from pipeline.common.run_lock import RunLock
from pipeline.tracking.journal import RUN_FILE, DeliveryRecord
from pipeline.tracking.server import RdptTrackingError, health_ok


def sync_run(run_dir: str | os.PathLike, tracking_uri: str | None = None, timeout: float = 600):
    from pipeline.tracking.credentials import take_credentials
    from pipeline.tracking.logger import RunTracker
    from pipeline.tracking.mlflow_sender import STATUSES

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RdptTrackingError(f"{run_dir}: no such run directory")
    lock = RunLock(run_dir)
    holder = lock.holder()
    if holder is not None and lock.stale_reason(holder) is None:
        raise RdptTrackingError(
            f"{run_dir} is in use by a live run (host {holder.get('host')}, pid "
            f"{holder.get('pid')}): its own tracker delivers its metrics; sync after it ended"
        )
    saved = DeliveryRecord(run_dir).run()
    resolved = _resolved(run_dir)
    tracking = resolved.get("tracking") or {}
    uri = take_credentials(
        tracking_uri
        or saved.get("tracking_uri")
        or tracking.get("uri")
        or os.environ.get("MLFLOW_TRACKING_URI")
    )
    if not uri:
        raise RdptTrackingError(
            f"{run_dir}: no tracking URI in {RUN_FILE} or resolved.yaml; pass --tracking-uri"
        )
    if uri.startswith(("http://", "https://")) and not health_ok(uri, timeout=5.0):
        raise RdptTrackingError(f"no MLflow server answers at {uri}; nothing was delivered")
    experiment = saved.get("experiment") or tracking.get("experiment") or "rdpt"
    name = saved.get("run_name") or (resolved.get("run") or {}).get("name") or run_dir.name
    previous = _status(uri, saved.get("run_id"))

    tracker = RunTracker(run_dir, uri, experiment, name, system_metrics_interval=0)
    run_id = tracker.ensure_run()
    if run_id is None:
        raise RdptTrackingError(f"could not create or continue the MLflow run at {uri}")
    delivered = tracker.flush(timeout)
    sender = tracker.mlflow
    if sender.earlier_status:
        status = sender.earlier_status
    elif previous in STATUSES:
        status = previous
    else:
        status = "FINISHED" if (run_dir / "COMPLETED").exists() else "KILLED"
    delivered = tracker.close(status, timeout=timeout) and delivered
    return {
        "run_id": run_id,
        "tracking_uri": uri,
        "metric_lines": sender.replayed_lines,
        "status": status,
        "delivered": delivered,
    }


def _resolved(run_dir: Path) -> dict:
    path = run_dir / "resolved.yaml"
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}


def _status(uri: str, run_id: str | None) -> str | None:
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri=uri).get_run(run_id).info.status
    except MlflowException:
        return None
