"""WebDataset shards of packed sequences: writing (deterministic bytes) and indexed reading.

A shard is a plain tar written with WebDataset's `TarWriter` (fixed mtime/owner/mode, so the
bytes depend only on the content). Member `{m:010d}.npy` (m = the member's index within its
split) holds a `.npy` array [n <= seqs_per_member, seq_len + 1]. Reading uses `wids`
(WebDataset's indexed tar access through mmap), so any member is a seek, not a scan.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_open, sha256_file
from pipeline.errors import RdptDataError


def member_key(member_index: int) -> str:
    return f"{member_index:010d}"


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def write_shard(path: Path, rows: np.ndarray, first_member: int, seqs_per_member: int) -> str:
    """Write `rows` [n, seq_len+1] as members of `seqs_per_member` rows (crash-safe); returns
    the shard's sha256."""
    import webdataset as wds

    with atomic_open(path, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0.0, user="rdpt", group="rdpt", mode=0o444)
        for m, start in enumerate(range(0, len(rows), seqs_per_member)):
            block = rows[start : start + seqs_per_member]
            writer.write({"__key__": member_key(first_member + m), "npy": npy_bytes(block)})
        writer.close()
    return sha256_file(path)


class ShardReader:
    """Indexed access to the members of one shard, checked against the manifest's counts.

    Every failure (missing file, truncated or corrupted tar, bad array) is an RdptDataError
    that names the shard.
    """

    def __init__(self, path: str | Path, sequences: int, seq_len: int, dtype: str,
                 seqs_per_member: int):
        from wids.wids import IndexedTarSamples

        self.path = Path(path)
        self.sequences = sequences
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        self.seqs_per_member = seqs_per_member
        self.num_members = -(-sequences // seqs_per_member)
        if not self.path.is_file():
            raise RdptDataError(f"shard missing: {self.path}")
        try:
            self._tar = IndexedTarSamples(path=str(self.path))
        except Exception as e:  # wids raises assorted errors on a damaged tar
            raise RdptDataError(f"shard {self.path} is corrupted or truncated ({e})") from None
        if len(self._tar) != self.num_members:
            self.close()
            raise RdptDataError(
                f"shard {self.path} is corrupted or truncated: {len(self._tar)} members, "
                f"manifest says {self.num_members}"
            )

    def member_rows(self, m: int) -> int:
        return min(self.seqs_per_member, self.sequences - m * self.seqs_per_member)

    def member(self, m: int) -> np.ndarray:
        """Member `m` as an array [rows, seq_len+1]."""
        try:
            sample = self._tar[m]
            arr = np.load(sample[".npy"], allow_pickle=False)
        except Exception as e:
            raise RdptDataError(
                f"shard {self.path} member {m} is corrupted or truncated ({type(e).__name__}: {e})"
            ) from None
        want = (self.member_rows(m), self.seq_len + 1)
        if arr.shape != want or arr.dtype != self.dtype:
            raise RdptDataError(
                f"shard {self.path} member {m}: array {arr.dtype}{list(arr.shape)}, manifest "
                f"says {self.dtype}{list(want)}"
            )
        return arr

    def close(self) -> None:
        self._tar.close()
