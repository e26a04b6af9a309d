"""Data fixtures shared by every area's tests (registered in conftest.py).

`tiny_dataset`: the Path of a small real dataset prepared with the real `rdpt prep` code
(~400 KB of standard-library text, byte-level BPE of 512 tokens, seq_len 64, val_fraction 0.1,
~2500 training and ~400 validation sequences, uint16, 16 sequences per member). Built once per
test session in a temporary directory in about 2 s. Treat it as read-only.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

TINY_SEQ_LEN = 64
TINY_VOCAB = 512


def stdlib_subset() -> list[str]:
    """A few standard-library packages: real text (code + docstrings), present everywhere."""
    from data_prep.sources import stdlib_root

    root = stdlib_root()
    return [str(root / name) for name in ("json", "email", "importlib", "collections")]


def build_tiny_dataset(output: Path, **overrides) -> Path:
    """Prepare the tiny dataset into `output` (in this process, one worker)."""
    from data_prep.config import PrepConfig
    from data_prep.prep import prepare

    fields = dict(
        inputs=stdlib_subset(),
        output=str(output),
        limit_bytes=400_000,
        tokenizer={"vocab_size": TINY_VOCAB},
        seq_len=TINY_SEQ_LEN,
        val_fraction=0.1,
        seqs_per_member=16,
        shard_size_mb=0.1,  # several shards per split, as in a real dataset
        workers=1,
    )
    fields.update(overrides)
    prepare(PrepConfig(**fields))
    return output


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Path of a small prepared dataset (see the module docstring)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return build_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


@contextlib.contextmanager
def small_filesystem(path: Path, size: str):
    """A tmpfs of `size` (e.g. "300k") mounted at `path` for the block (needs root, as the
    Slurm fixture does): a real full disk for ENOSPC tests. Unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
