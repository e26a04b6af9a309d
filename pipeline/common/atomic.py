"""Crash-safe file output: write under a temporary name in the same directory, fsync,
then rename into place, so a reader never sees a half-written file under its final name.

Outputs get the mode a plain `open()` / `mkdir()` would give them (0666 / 0777 minus the
umask), not the private 0600 / 0700 of `tempfile`: a teammate who may read a run directory
can verify and evaluate its checkpoints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.common.errors import RdptDiskFullError, is_disk_full

TMP_PREFIX = ".tmp-"
_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting and restoring it, under a lock)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """What open() (0o666) or mkdir() (0o777) would create under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of `path` for writing; rename it to `path` on success.

    On an exception the temporary file is removed and `path` is left untouched; a full file
    system raises RdptDiskFullError naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    os.fchmod(fd, default_mode())
    os.close(fd)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_disk_full(e):
            raise disk_full_error(path, e) from e
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    with open(src, "rb") as fin, atomic_open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name; rename it to `path` when the block succeeds.

    `path` must not exist yet (the caller decides what to do with an old one). On an
    exception the temporary directory is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent))
    tmp.chmod(default_mode(directory=True))
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                # NOTE: some writers create private files (safetensors writes 0600)
                p.chmod(default_mode())
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e, where=path.parent):
            raise disk_full_error(path, e) from e
        raise


def disk_full_error(path: Path, cause: BaseException) -> RdptDiskFullError:
    return RdptDiskFullError(
        f"no space left on device writing {path} ({cause}); nothing was written under that "
        f"name and earlier outputs are intact: free space (or raise the quota) and run the "
        f"command again"
    )


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
