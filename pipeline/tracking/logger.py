"""`RunTracker`: one training/evaluation run's link to MLflow that never slows or stops training.

- `log_metrics(values, step)` appends one JSON line to `run_dir/metrics.jsonl` (always, also
  with `enabled=False` or no tracking URI) and queues the values; it costs microseconds.
- A background thread sends the queue every `flush_interval` seconds with
  `MlflowClient.log_batch` (a synchronous `log_metric` per step costs ~70 ms over HTTP).
- While the server is down or unreachable the queue keeps growing; the thread polls `/health`
  and delivers everything, in order, when the server is back. Metric timestamps are fixed at
  `log_metrics` time and the MLflow store drops exact duplicates, so a retried batch is never
  counted twice.
- What was delivered is recorded as a byte offset into metrics.jsonl
  (`run_dir/mlflow_delivered.json`). A later tracker on the same run dir (a resumed or requeued
  job) continues the same MLflow run (`run_dir/mlflow_run.json`) and first replays the lines
  that never reached the server, so a job that ended while the server was down loses nothing.
- System metrics (`system/*`: CPU %, RAM, GPU utilisation/memory where visible) are sampled by
  the same thread every `system_metrics_interval` seconds.

Only rank 0 of a distributed job should create a RunTracker.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import math
import os
import posixpath
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline.common.atomic import atomic_write_json
from pipeline.tracking.server import health_ok

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
DELIVERED_FILE = "mlflow_delivered.json"
METRICS_FILE = "metrics.jsonl"
REFS_DIR = "mlflow_refs"

MAX_PARAM_VAL = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VAL = 8000
MAX_KEY = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
_NAME_RE = re.compile(r"^[\w.\- /:]+$")
_RESERVED = ("step", "timestamp")


def valid_name(name: str) -> bool:
    """MLflow's rule for metric/param/tag names (characters, no `..`, no leading `/`)."""
    norm = posixpath.normpath(name)
    return bool(_NAME_RE.match(name)) and norm == name and not norm.startswith(("/", ".."))


def _clean_key(key: Any) -> str:
    k = str(key)
    if not valid_name(k):
        k = re.sub(r"[^\w.\- /:]", "_", k).strip("/") or "_"
        k = posixpath.normpath(k).lstrip("./") or "_"
    return k[:MAX_KEY]


def _stringify(value: Any, limit: int) -> str:
    if isinstance(value, str):
        s = value
    elif isinstance(value, (bool, int, float)) or value is None:
        s = str(value)
    else:
        try:
            s = json.dumps(value, default=str, sort_keys=True)
        except (TypeError, ValueError):
            s = str(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


class _Op:
    """One queued MLflow operation. `end_offset` is set for metrics.jsonl lines."""

    __slots__ = ("kind", "payload", "end_offset")

    def __init__(self, kind: str, payload: Any, end_offset: int | None = None):
        self.kind = kind
        self.payload = payload
        self.end_offset = end_offset


class _PermanentError(Exception):
    """The server rejected the request (4xx): retrying cannot help."""


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
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        self.experiment = experiment
        self.run_name = run_name or self.run_dir.name
        self.enabled = bool(enabled and self.tracking_uri)
        if enabled and not self.tracking_uri:
            log.warning(
                "no tracking URI (argument or MLFLOW_TRACKING_URI): metrics go to %s only",
                self.run_dir / METRICS_FILE,
            )
        self.system_metrics_interval = system_metrics_interval or 0.0
        self.flush_interval = flush_interval
        self.checkpoint_artifact_max_bytes = checkpoint_artifact_max_bytes

        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._client = None
        self._existing_params: dict[str, str] = {}
        self._jsonl_path = self.run_dir / METRICS_FILE
        self._jsonl = open(self._jsonl_path, "ab")
        if self._jsonl.tell() and not _ends_with_newline(self._jsonl_path):
            # NOTE: a crash mid-line left a partial record; keep it on its own (unreadable)
            # line instead of gluing the next record to it.
            self._jsonl.write(b"\n")
            self._jsonl.flush()
        # Lines already in metrics.jsonl before this tracker: candidates for replay.
        self._replay_end = self._jsonl.tell()
        self._delivered_offset = 0
        self._delivered_written = 0
        self._last_step = 0

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: collections.deque[_Op] = collections.deque()
        self._sending = 0
        self._resolve_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._closed = False
        self._server_ok = True
        self._outage_since: float | None = None
        self._worker: threading.Thread | None = None
        self.stats = {"batches": 0, "metrics_sent": 0, "send_failures": 0, "dropped_ops": 0}
        if self.enabled:
            self._worker = threading.Thread(
                target=self._run_worker, name="rdpt-mlflow", daemon=True
            )
            self._worker.start()
            atexit.register(self._flush_at_exit)

    # ---------------------------------------------------------------- public API

    def ensure_run(self) -> str | None:
        """Create the MLflow run, or continue the one recorded in run_dir/mlflow_run.json.

        Returns the run id, or None when tracking is disabled or the server cannot be reached
        now (the background thread then creates/continues the run when it is back).
        """
        if not self.enabled:
            return None
        if self.run_id is None and self._reachable():
            try:
                self._resolve_run()
            except Exception as e:  # noqa: BLE001 - tracking must never stop training
                log.warning("MLflow run not ready yet (%s); will retry in the background", e)
        return self.run_id

    def log_params(self, flat: Mapping[str, Any]) -> None:
        """Queue params (a flat dict, e.g. `config_io.flatten(cfg)`).

        Values are stringified (JSON for lists/dicts) and cut to MLflow's 6000 characters;
        keys with characters MLflow refuses get `_` instead. On a continued run, a param whose
        value changed is not re-logged (MLflow forbids it) but recorded as tag
        `rdpt.param_changed.<key>` with the new value.
        """
        params = {_clean_key(k): _stringify(v, MAX_PARAM_VAL) for k, v in flat.items()}
        self._enqueue(_Op("params", params))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Queue tags (values stringified, cut to 8000 characters)."""
        self._enqueue(
            _Op("tags", {_clean_key(k): _stringify(v, MAX_TAG_VAL) for k, v in tags.items()})
        )

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
        line = json.dumps({"step": step, "timestamp": ts, **values}) + "\n"
        with self._lock:
            if self._closed:
                raise RuntimeError("RunTracker.log_metrics after close()")
            self._jsonl.write(line.encode())
            self._jsonl.flush()
            self._last_step = step
            if self.enabled:
                items = [(k, v, ts, step) for k, v in values.items()]
                self._queue.append(_Op("metrics", items, self._jsonl.tell()))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Queue the upload of a file or directory (it must still exist at the next send)."""
        self._enqueue(_Op("artifact", (str(Path(path).resolve()), artifact_path)))

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
        p = Path(path).resolve()
        if size is None:
            size = _tree_size(p)
        upload = size <= self.checkpoint_artifact_max_bytes
        name = f"step-{int(step):08d}"
        ref = {
            "path": str(p),
            "host": socket.gethostname(),
            "step": int(step),
            "size": int(size),
            "sha256": sha256,
            "uploaded_as_artifact": upload,
        }
        ref_path = self.run_dir / REFS_DIR / f"{name}.json"
        atomic_write_json(ref_path, ref)
        self.log_artifact(ref_path, "checkpoints")
        self.set_tags(
            {
                "checkpoint.latest.path": str(p),
                "checkpoint.latest.step": int(step),
                "checkpoint.latest.size": int(size),
                "checkpoint.latest.sha256": sha256 or "",
            }
        )
        if upload:
            self.log_artifact(p, f"checkpoints/{name}" if p.is_dir() else "checkpoints")

    def flush(self, timeout: float = 30.0, down_grace: float | None = None) -> bool:
        """Wait until everything queued reached MLflow; False on timeout (nothing is lost:
        it stays queued, and in metrics.jsonl).

        `down_grace`: give up earlier, once the server has been unreachable for that many
        seconds during this call (None: wait for the whole timeout).
        """
        if not self.enabled or self._worker is None:
            return True
        deadline = time.monotonic() + timeout
        down_since = None
        self._wake.set()
        with self._changed:
            while self._queue or self._sending:
                now = time.monotonic()
                if self._server_ok:
                    down_since = None
                elif down_since is None:
                    down_since = now
                if (
                    down_grace is not None
                    and down_since is not None
                    and now - down_since >= down_grace
                ):
                    return False
                left = deadline - now
                if left <= 0 or not self._worker.is_alive():
                    return False
                self._changed.wait(min(left, 0.5))
                self._wake.set()
        return True

    def close(
        self, status: str = "FINISHED", timeout: float = 30.0, down_grace: float = 5.0
    ) -> bool:
        """Mark the run `status` (FINISHED, FAILED, KILLED), flush, stop the thread.

        Waits up to `timeout` s while the server answers, but only `down_grace` s once it is
        unreachable (a preempted job must not spend its grace period on a dead server).
        Returns False when something was not delivered; it is in metrics.jsonl and a tracker
        on the same run dir (the resumed job) replays it.
        """
        if self._closed:
            return True
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, not {status!r}")
        self._enqueue(_Op("status", status))
        ok = self.flush(timeout, down_grace=down_grace)
        with self._lock:
            self._stop = True
            self._closed = True
            pending = len(self._queue) + self._sending
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=min(5.0, max(timeout, 0.5)))
        self._write_delivered(force=True)
        with self._lock:
            self._jsonl.close()
        if not ok:
            log.warning(
                "MLflow: %d operations not delivered to %s (metrics are in %s; a "
                "resumed run replays them)",
                pending,
                self.tracking_uri,
                self._jsonl_path,
            )
        return ok

    def __enter__(self) -> RunTracker:
        self.ensure_run()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(
            "FINISHED"
            if exc_type is None
            else "KILLED"
            if issubclass(exc_type, KeyboardInterrupt)
            else "FAILED"
        )

    def _flush_at_exit(self) -> None:
        # A process that never called close(): deliver what we can; the rest is replayed later.
        if not self._closed:
            self.flush(timeout=10.0)

    @property
    def pending(self) -> int:
        """Number of queued operations not yet delivered."""
        with self._lock:
            return len(self._queue) + self._sending

    # ---------------------------------------------------------------- internals

    def _enqueue(self, op: _Op) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._closed:
                raise RuntimeError(f"RunTracker.{op.kind} after close()")
            self._queue.append(op)

    def _reachable(self) -> bool:
        uri = self.tracking_uri or ""
        if uri.startswith(("http://", "https://")):
            return health_ok(uri, timeout=2.0)
        return True

    def _get_client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _resolve_run(self) -> None:
        """Find or create the experiment and the run; queue the replay of undelivered lines."""
        from mlflow.exceptions import MlflowException

        with self._resolve_lock:
            if self.run_id is not None:
                return
            client = self._get_client()
            saved = _read_json(self.run_dir / RUN_FILE)
            run = None
            if saved.get("run_id"):
                try:
                    run = client.get_run(saved["run_id"])
                except MlflowException as e:
                    if e.get_http_status_code() >= 500:
                        raise
                    log.warning(
                        "run %s from %s is not in %s (%s): starting a new MLflow run",
                        saved["run_id"],
                        self.run_dir / RUN_FILE,
                        self.tracking_uri,
                        e.error_code,
                    )
            if run is not None:
                if run.info.status != "RUNNING":
                    client.update_run(run.info.run_id, status="RUNNING")
                self._existing_params = dict(run.data.params)
            else:
                exp_id = self._experiment_id(client)
                tags = {"rdpt.run_dir": str(self.run_dir.resolve())}
                run = client.create_run(exp_id, run_name=self.run_name, tags=tags)
            self.experiment_id = run.info.experiment_id
            atomic_write_json(
                self.run_dir / RUN_FILE,
                {
                    "run_id": run.info.run_id,
                    "experiment_id": run.info.experiment_id,
                    "experiment": self.experiment,
                    "run_name": run.info.run_name,
                    "tracking_uri": self.tracking_uri,
                },
            )
            delivered = _read_json(self.run_dir / DELIVERED_FILE)
            start = delivered.get("offset", 0) if delivered.get("run_id") == run.info.run_id else 0
            replay = list(self._read_lines(start, self._replay_end))
            with self._lock:
                self._queue.extendleft(reversed(replay))
                self._delivered_offset = start
                self.run_id = run.info.run_id
            if replay:
                log.info("MLflow: replaying %d metric lines from %s", len(replay), self._jsonl_path)

    def _experiment_id(self, client) -> str:
        from mlflow.exceptions import MlflowException

        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        location = None
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri[len("sqlite:///") :]).resolve()
            location = (db.parent / "artifacts").as_uri()
        try:
            return client.create_experiment(self.experiment, artifact_location=location)
        except MlflowException:  # created concurrently by another process
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def _read_lines(self, start: int, end: int) -> Iterable[_Op]:
        if end <= start:
            return
        with open(self._jsonl_path, "rb") as f:
            f.seek(start)
            offset = start
            for raw in f.read(end - start).splitlines(keepends=True):
                offset += len(raw)
                try:
                    rec = json.loads(raw)
                    step, ts = int(rec.pop("step")), int(rec.pop("timestamp"))
                    items = [(k, float(v), ts, step) for k, v in rec.items()]
                except (ValueError, KeyError, TypeError):
                    log.warning(
                        "skipping unreadable line at byte %d of %s",
                        offset - len(raw),
                        self._jsonl_path,
                    )
                    continue
                yield _Op("metrics", items, offset)

    def _run_worker(self) -> None:
        next_sample = time.monotonic()
        delay = self.flush_interval
        if self.system_metrics_interval:
            _system_metrics()  # prime psutil's cpu_percent
        while True:
            self._wake.wait(delay)
            self._wake.clear()
            now = time.monotonic()
            if self.system_metrics_interval and now >= next_sample and not self._stop:
                next_sample = now + self.system_metrics_interval
                self._sample_system()
            with self._lock:
                if self._stop:
                    return
                empty = not self._queue
            if empty:
                delay = self.flush_interval
                continue
            if self._drain():
                if not self._server_ok:
                    log.warning(
                        "MLflow server %s is back after %.0f s; delivered the backlog",
                        self.tracking_uri,
                        time.monotonic() - (self._outage_since or now),
                    )
                self._server_ok, self._outage_since = True, None
                delay = self.flush_interval
            elif self._stop:
                return
            else:
                self.stats["send_failures"] += 1
                if self._server_ok:
                    log.warning(
                        "MLflow server %s unreachable: buffering (%d queued); training continues",
                        self.tracking_uri,
                        self.pending,
                    )
                    self._server_ok, self._outage_since = False, now
                    delay = 0.5
                else:
                    delay = min(max(delay * 2, 0.5), 5.0)

    def _drain(self) -> bool:
        """Send the whole queue; False when the server is unreachable (retry later)."""
        # NOTE: a health probe (~1 ms) before every send: without it, the first request to a
        # server that just went away sits in MLflow's own HTTP retries (minutes of backoff).
        if not self._reachable():
            return False
        try:
            if self.run_id is None:
                self._resolve_run()
            while True:
                with self._lock:
                    if self._stop:  # closed: a later tracker on this run dir takes over
                        return False
                    ops = self._take_batch()
                    if not ops:
                        return True
                    self._sending = len(ops)
                try:
                    self._send(ops)
                    self.stats["batches"] += 1
                except _PermanentError as e:
                    self.stats["dropped_ops"] += len(ops)
                    log.warning(
                        "MLflow rejected %s (%s); dropped (still in metrics.jsonl)", ops[0].kind, e
                    )
                except Exception:
                    with self._lock:
                        self._queue.extendleft(reversed(ops))
                        self._sending = 0
                        self._changed.notify_all()
                    raise
                with self._lock:
                    self._sending = 0
                    offsets = [op.end_offset for op in ops if op.end_offset is not None]
                    if offsets:
                        self._delivered_offset = max(self._delivered_offset, max(offsets))
                    self._changed.notify_all()
                self._write_delivered()
        except Exception as e:  # noqa: BLE001 - connection errors, 5xx, store busy
            log.debug("MLflow send failed: %s", e)
            return False

    def _take_batch(self) -> list[_Op]:
        """Pop the next request's worth of ops (caller holds the lock)."""
        if not self._queue:
            return []
        head = self._queue.popleft()
        ops = [head]
        if head.kind == "metrics" or head.kind == "system":
            n = len(head.payload)
            while self._queue and self._queue[0].kind in ("metrics", "system"):
                m = len(self._queue[0].payload)
                if n + m > MAX_METRICS_PER_BATCH:
                    break
                ops.append(self._queue.popleft())
                n += m
        return ops

    def _send(self, ops: list[_Op]) -> None:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.exceptions import MlflowException

        client, run_id = self._get_client(), self.run_id
        kind = ops[0].kind
        try:
            if kind in ("metrics", "system"):
                metrics = [Metric(k, v, ts, step) for op in ops for (k, v, ts, step) in op.payload]
                for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                    client.log_batch(
                        run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH], synchronous=True
                    )
                self.stats["metrics_sent"] += len(metrics)
            elif kind == "params":
                new, changed = {}, {}
                for k, v in ops[0].payload.items():
                    old = self._existing_params.get(k)
                    if old is None:
                        new[k] = v
                    elif old != v:
                        changed[f"rdpt.param_changed.{k}"[:MAX_KEY]] = v
                items = [Param(k, v) for k, v in new.items()]
                for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
                    client.log_batch(
                        run_id, params=items[i : i + MAX_PARAMS_PER_BATCH], synchronous=True
                    )
                self._existing_params.update(new)
                if changed:
                    log.warning(
                        "params changed on a continued run (kept the first values, new "
                        "ones as tags): %s",
                        sorted(changed),
                    )
                    self._log_tags(client, run_id, changed, RunTag)
            elif kind == "tags":
                self._log_tags(client, run_id, ops[0].payload, RunTag)
            elif kind == "artifact":
                path, artifact_path = ops[0].payload
                if not os.path.exists(path):
                    raise _PermanentError(f"artifact {path} no longer exists")
                if os.path.isdir(path):
                    client.log_artifacts(run_id, path, artifact_path)
                else:
                    client.log_artifact(run_id, path, artifact_path)
            elif kind == "status":
                client.set_terminated(run_id, status=ops[0].payload)
        except MlflowException as e:
            code = e.get_http_status_code()
            if 400 <= code < 500 and code != 429:
                raise _PermanentError(f"{e.error_code}: {str(e)[:300]}") from e
            raise

    @staticmethod
    def _log_tags(client, run_id, tags: Mapping[str, str], RunTag) -> None:
        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, tags=items[i : i + MAX_PARAMS_PER_BATCH], synchronous=True)

    def _write_delivered(self, force: bool = False) -> None:
        with self._lock:
            offset, run_id = self._delivered_offset, self.run_id
        if run_id is None or offset == self._delivered_written:
            return
        now = time.monotonic()
        if not force and now - getattr(self, "_delivered_t", 0.0) < 2.0:
            return
        self._delivered_t = now
        atomic_write_json(self.run_dir / DELIVERED_FILE, {"run_id": run_id, "offset": offset})
        self._delivered_written = offset

    def _sample_system(self) -> None:
        try:
            values = _system_metrics()
        except Exception as e:  # noqa: BLE001 - a missing sensor must not stop anything
            log.debug("system metrics failed: %s", e)
            return
        ts = int(time.time() * 1000)
        with self._lock:
            step = self._last_step
            self._queue.append(_Op("system", [(k, v, ts, step) for k, v in values.items()]))


def _system_metrics() -> dict[str, float]:
    """CPU %, memory and, where CUDA is in use, GPU utilisation/memory (psutil, NVML/torch)."""
    import psutil

    vm = psutil.virtual_memory()
    proc = psutil.Process()
    out = {
        "system/cpu_utilization_percentage": psutil.cpu_percent(interval=None),
        "system/system_memory_usage_megabytes": (vm.total - vm.available) / 2**20,
        "system/system_memory_usage_percentage": vm.percent,
        "system/process_memory_rss_megabytes": proc.memory_info().rss / 2**20,
    }
    out.update(_gpu_metrics())
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _gpu_metrics() -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        import pynvml  # nvidia-ml-py, when installed

        pynvml.nvmlInit()
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out[f"system/gpu_{i}_utilization_percentage"] = float(util.gpu)
            out[f"system/gpu_{i}_memory_usage_megabytes"] = mem.used / 2**20
            out[f"system/gpu_{i}_memory_usage_percentage"] = 100.0 * mem.used / mem.total
        return out
    except Exception:  # noqa: BLE001 - no NVML bindings: try nvidia-smi, then torch
        pass
    out = _nvidia_smi_metrics()
    if out:
        return out
    torch = sys.modules.get("torch")  # never import torch here: only report what is in use
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        i = torch.cuda.current_device()
        out[f"system/gpu_{i}_memory_allocated_megabytes"] = torch.cuda.memory_allocated(i) / 2**20
        out[f"system/gpu_{i}_memory_reserved_megabytes"] = torch.cuda.memory_reserved(i) / 2**20
    return out


def _nvidia_smi_metrics() -> dict[str, float]:
    """GPU utilisation/memory from `nvidia-smi` (shipped with the driver), {} without it."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    cmd = [
        exe,
        "--query-gpu=index,utilization.gpu,memory.used,memory.total",
        "--format=csv,noheader,nounits",
    ]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if re.fullmatch(r"\d+(,\d+)*", visible):
        cmd.append(f"--id={visible}")
    try:
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    out = {}
    for line in text.strip().splitlines():
        try:
            idx, util, used, total = (float(x) for x in line.split(","))
        except ValueError:
            continue
        i = int(idx)
        out[f"system/gpu_{i}_utilization_percentage"] = util
        out[f"system/gpu_{i}_memory_usage_megabytes"] = used
        out[f"system/gpu_{i}_memory_usage_percentage"] = 100.0 * used / total if total else 0.0
    return out


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _tree_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
