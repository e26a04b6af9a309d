"""The one interface every destination of run tracking implements, and the record it queues.

    class MetricsSink(Protocol):
        log_metrics(values, step) / log_params(flat) / set_tags(tags) / log_artifact(path, dest)
        flush(timeout) -> bool / close(status) -> bool

`RunTracker` (logger.py) fans out to its sinks: the metrics journal (journal.py, always) and the
MLflow sender (mlflow_sender.py, when a tracking URI is set). The system-metrics sampler and the
checkpoint references write into the MLflow sink through this interface.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class MetricsSink(Protocol):
    """A destination for a run's metrics, params, tags and artifacts."""

    def log_metrics(self, values: Mapping[str, float], step: int) -> None: ...

    def log_params(self, flat: Mapping[str, Any]) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...

    def flush(self, timeout: float = 30.0) -> bool: ...

    def close(self, status: str = "FINISHED") -> bool: ...


class Op:
    """One queued operation for the MLflow sender.

    kind: metrics | system | params | tags | artifact | status. `end_offset` is set for a line
    of metrics.jsonl: the byte offset just after it (how far delivery got once it is sent)."""

    __slots__ = ("end_offset", "kind", "payload")

    def __init__(self, kind: str, payload: Any, end_offset: int | None = None):
        self.kind = kind
        self.payload = payload
        self.end_offset = end_offset
