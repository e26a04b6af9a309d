"""The MLflow sink: a queue and a background thread that deliver a run's records, in order,
without ever making the training loop wait.

    sender = MlflowSender(run_dir, "http://127.0.0.1:5000", "rdpt", "tiny", journal)
    sender.ensure_run()                       # create, or continue the run in mlflow_run.json
    sender.log_metrics({"train/loss": 2.3}, step=10, timestamp_ms=..., journal_offset=...)
    sender.flush(30); sender.close("FINISHED")

- Sends every `flush_interval` seconds with `MlflowClient.log_batch` (a synchronous
  `log_metric` per step costs ~70 ms over HTTP).
- While the server is down the queue grows; the thread polls `/health` and delivers the backlog
  when it is back. Metric timestamps are fixed when logged and the store drops exact
  duplicates, so a retried batch is never counted twice.
- A continued run (resumed job) first replays the journal lines MLflow never received
  (journal.DeliveryRecord: a byte offset per run id).
- A 4xx answer is permanent: that record is dropped (it stays in metrics.jsonl) and counted.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import posixpath
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.tracking.journal import DeliveryRecord, MetricsJournal
from pipeline.tracking.server import health_ok
from pipeline.tracking.sink import Op

log = logging.getLogger("pipeline.tracking")

MAX_PARAM_VAL = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VAL = 8000
MAX_KEY = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
_NAME_RE = re.compile(r"^[\w.\- /:]+$")
STATUSES = ("FINISHED", "FAILED", "KILLED")


def valid_name(name: str) -> bool:
    """MLflow's rule for metric/param/tag names (characters, no `..`, no leading `/`)."""
    norm = posixpath.normpath(name)
    return bool(_NAME_RE.match(name)) and norm == name and not norm.startswith(("/", ".."))


def clean_key(key: Any) -> str:
    k = str(key)
    if not valid_name(k):
        k = re.sub(r"[^\w.\- /:]", "_", k).strip("/") or "_"
        k = posixpath.normpath(k).lstrip("./") or "_"
    return k[:MAX_KEY]


def stringify(value: Any, limit: int) -> str:
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


class _PermanentError(Exception):
    """The server rejected the request (4xx): retrying cannot help."""


class MlflowSender:
    """MetricsSink that delivers to an MLflow tracking server or sqlite store (see module doc)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        journal: MetricsJournal,
        *,
        flush_interval: float = 1.0,
    ):
        self.run_dir = Path(run_dir)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.journal = journal
        self.record = DeliveryRecord(run_dir)
        self.flush_interval = flush_interval
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.stats = {"batches": 0, "metrics_sent": 0, "send_failures": 0, "dropped_ops": 0}
        self._client = None
        self._existing_params: dict[str, str] = {}
        self._delivered_offset = 0
        self._delivered_written = 0
        self._delivered_t = 0.0
        self._last_step = 0
        self.earlier_status: str | None = None  # final status a closed tracker did not deliver
        self.replayed_lines = 0

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: collections.deque[Op] = collections.deque()
        self._sending = 0
        self._resolve_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._closed = False
        self._server_ok = True
        self._outage_since: float | None = None
        self._worker = threading.Thread(target=self._run_worker, name="rdpt-mlflow", daemon=True)
        self._worker.start()

    # ---------------------------------------------------------------- MetricsSink

    def log_metrics(
        self,
        values: Mapping[str, float],
        step: int,
        *,
        timestamp_ms: int | None = None,
        journal_offset: int | None = None,
    ) -> None:
        ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        items = [(k, float(v), ts, int(step)) for k, v in values.items()]
        with self._lock:
            self._last_step = int(step)
        self._enqueue(Op("metrics", items, journal_offset))

    def log_system_metrics(self, values: Mapping[str, float]) -> None:
        """System samples, at the last logged step (not journaled: not part of the run)."""
        ts = int(time.time() * 1000)
        with self._lock:
            step = self._last_step
            if not self._closed:
                self._queue.append(Op("system", [(k, v, ts, step) for k, v in values.items()]))

    def log_params(self, flat: Mapping[str, Any]) -> None:
        params = {clean_key(k): stringify(v, MAX_PARAM_VAL) for k, v in flat.items()}
        self._enqueue(Op("params", params))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._enqueue(
            Op("tags", {clean_key(k): stringify(v, MAX_TAG_VAL) for k, v in tags.items()})
        )

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._enqueue(Op("artifact", (str(Path(path).resolve()), artifact_path)))

    def flush(self, timeout: float = 30.0, down_grace: float | None = None) -> bool:
        """Wait until everything queued reached MLflow; False on timeout (nothing is lost: it
        stays queued, and in metrics.jsonl). `down_grace`: give up earlier, once the server has
        been unreachable for that many seconds during this call."""
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
                if down_grace is not None and down_since is not None:
                    if now - down_since >= down_grace:
                        return False
                left = deadline - now
                if left <= 0 or not self._worker.is_alive():
                    return False
                self._changed.wait(min(left, 0.5))
                self._wake.set()
        return True

    def close(self, status: str = "FINISHED", timeout: float = 30.0, down_grace: float = 5.0):
        """Queue the run's final status, flush (see RunTracker.close), stop the thread.

        What was not delivered is kept for the next tracker on this run directory (`rdpt runs
        sync`, a resumed run): metric lines in the journal (with the delivered offset), every
        other record in mlflow_pending.json. Returns (everything delivered, what is pending:
        {"metric_lines", "steps", "other"})."""
        if status not in STATUSES:
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, not {status!r}")
        self._enqueue(Op("status", status))
        ok = self.flush(timeout, down_grace=down_grace)
        with self._lock:
            self._stop = True
            self._closed = True
        self._wake.set()
        self._worker.join(timeout=min(5.0, max(timeout, 0.5)))
        self._write_delivered(force=True)
        with self._lock:
            left = list(self._queue)
        self.record.save_pending(left)
        return ok, self._describe_pending(left)

    def _describe_pending(self, left: list[Op]) -> dict:
        lines = list(self.journal.read_ops(self._undelivered_from(), self.journal.size))
        steps = sorted({step for op in lines for (*_, step) in op.payload})
        other = [op.kind for op in left if op.kind not in ("metrics", "system")]
        return {"metric_lines": len(lines), "steps": steps, "other": other}

    def _undelivered_from(self) -> int:
        """Journal offset from which nothing is known to have reached the current run."""
        with self._lock:
            if self.run_id is None:
                return self.record.offset_for(self.record.run().get("run_id", ""))
            return self._delivered_offset

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue) + self._sending

    @property
    def delivered_offset(self) -> int:
        with self._lock:
            return self._delivered_offset

    # ---------------------------------------------------------------- the run

    def ensure_run(self) -> str | None:
        """Create the MLflow run, or continue the one in run_dir/mlflow_run.json; None when the
        server cannot be reached now (the thread creates/continues it when it is back)."""
        if self.run_id is None and self.reachable():
            try:
                self._resolve_run()
            except Exception as e:  # noqa: BLE001 - tracking must never stop training
                log.warning("MLflow run not ready yet (%s); will retry in the background", e)
        return self.run_id

    def reachable(self) -> bool:
        uri = self.tracking_uri or ""
        if uri.startswith(("http://", "https://")):
            return health_ok(uri, timeout=2.0)
        return True

    def _client_(self):
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
            client = self._client_()
            saved = self.record.run()
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
                        self.record.run_dir,
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
            self.record.save_run(
                {
                    "run_id": run.info.run_id,
                    "experiment_id": run.info.experiment_id,
                    "experiment": self.experiment,
                    "run_name": run.info.run_name,
                    "tracking_uri": self.tracking_uri,
                }
            )
            start = self.record.offset_for(run.info.run_id)
            replay = list(self.journal.read_ops(start, self.journal.replay_end))
            # what an earlier tracker could not deliver: params, tags, artifacts first, then
            # the metric lines; an earlier final status only if this tracker sets none
            earlier = self.record.pending_ops()
            self.earlier_status = next((o.payload for o in earlier if o.kind == "status"), None)
            first = [o for o in earlier if o.kind != "status"] + replay
            self.replayed_lines = len(replay)
            with self._lock:
                self._queue.extendleft(reversed(first))
                self._delivered_offset = start
                self.run_id = run.info.run_id
            if replay:
                log.info(
                    "MLflow: replaying %d metric lines from %s", len(replay), self.journal.path
                )

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

    # ---------------------------------------------------------------- the thread

    def _enqueue(self, op: Op) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"RunTracker.{op.kind} after close()")
            self._queue.append(op)

    def _run_worker(self) -> None:
        delay = self.flush_interval
        while True:
            self._wake.wait(delay)
            self._wake.clear()
            now = time.monotonic()
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
        if not self.reachable():
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

    def _take_batch(self) -> list[Op]:
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

    def _send(self, ops: list[Op]) -> None:
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException

        client, run_id = self._client_(), self.run_id
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
                        "params changed on a continued run (kept the first values, new ones as "
                        "tags): %s",
                        sorted(changed),
                    )
                    self._log_tags(client, run_id, changed)
            elif kind == "tags":
                self._log_tags(client, run_id, ops[0].payload)
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
    def _log_tags(client, run_id, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, tags=items[i : i + MAX_PARAMS_PER_BATCH], synchronous=True)

    def _write_delivered(self, force: bool = False) -> None:
        with self._lock:
            offset, run_id = self._delivered_offset, self.run_id
        if run_id is None or offset == self._delivered_written:
            return
        now = time.monotonic()
        if not force and now - self._delivered_t < 2.0:
            return
        self._delivered_t = now
        self.record.save_offset(run_id, offset)
        self._delivered_written = offset
