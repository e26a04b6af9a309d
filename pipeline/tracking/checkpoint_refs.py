"""How a checkpoint reaches MLflow: a small JSON reference always, the files when small.

    log_checkpoint_reference(sink, run_dir, path, step, sha256=..., max_upload_bytes=64 << 20)

The reference (`checkpoints/step-XXXXXXXX.json` artifact: path, host, step, size, sha256,
whether it was uploaded) and the tags `checkpoint.latest.{path,step,size,sha256}` name the
checkpoint on its file system; checkpoints up to `max_upload_bytes` are also uploaded as
artifacts under `checkpoints/step-XXXXXXXX/`.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pipeline.common.atomic import atomic_write_json

REFS_DIR = "mlflow_refs"


def log_checkpoint_reference(
    sink,
    run_dir: str | os.PathLike,
    path: str | os.PathLike,
    step: int,
    *,
    size: int | None = None,
    sha256: str | None = None,
    max_upload_bytes: int = 64 << 20,
) -> dict:
    """Write the reference under run_dir/mlflow_refs/ and queue it (and the tags, and the
    checkpoint itself when small enough) on `sink`. Returns the reference."""
    p = Path(path).resolve()
    if size is None:
        size = tree_size(p)
    upload = size <= max_upload_bytes
    name = f"step-{int(step):08d}"
    ref = {
        "path": str(p),
        "host": socket.gethostname(),
        "step": int(step),
        "size": int(size),
        "sha256": sha256,
        "uploaded_as_artifact": upload,
    }
    ref_path = Path(run_dir) / REFS_DIR / f"{name}.json"
    atomic_write_json(ref_path, ref)
    sink.log_artifact(ref_path, "checkpoints")
    sink.set_tags(
        {
            "checkpoint.latest.path": str(p),
            "checkpoint.latest.step": int(step),
            "checkpoint.latest.size": int(size),
            "checkpoint.latest.sha256": sha256 or "",
        }
    )
    if upload:
        sink.log_artifact(p, f"checkpoints/{name}" if p.is_dir() else "checkpoints")
    return ref


def tree_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
