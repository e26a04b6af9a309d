"""WebDataset shards of packed sequences: writing (deterministic bytes) and indexed reading.

A shard is a plain tar laid out exactly as WebDataset's `TarWriter` writes it with a fixed
mtime/owner/mode (a test checks the bytes are identical), so the bytes depend only on the
content. Member `{m:010d}.npy` (m = the member's index within its split) holds a `.npy` array
[n <= seqs_per_member, seq_len + 1]. The training reader uses `wids` (WebDataset's indexed tar
access through mmap), so any member is a seek, not a scan.

NOTE: writing, `rdpt prep verify` and `inspect` use the standard library's `tarfile` with the
same layout: importing `webdataset`/`wids` imports torch (~1 s), a fifth of a whole prep run
of 50 MB on two cores.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from pipeline.common.atomic import atomic_open, sha256_file
from pipeline.common.errors import RdptDataError


def member_key(member_index: int) -> str:
    return f"{member_index:010d}"


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


TAR_OWNER = "rdpt"
TAR_MODE = 0o444


def write_tar_members(fileobj, members: list[tuple[str, bytes]]) -> None:
    """A tar stream byte-identical to `webdataset.TarWriter(fileobj, encoder=False, mtime=0.0,
    user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE)` writing the same (name, data) members."""
    with tarfile.open(fileobj=fileobj, mode="w|") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0.0
            info.mode = TAR_MODE
            info.uname = info.gname = TAR_OWNER
            tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, rows: np.ndarray, first_member: int, seqs_per_member: int) -> str:
    """Write `rows` [n, seq_len+1] as members of `seqs_per_member` rows (crash-safe); returns
    the shard's sha256."""
    members = [
        (member_key(first_member + m) + ".npy", npy_bytes(rows[start : start + seqs_per_member]))
        for m, start in enumerate(range(0, len(rows), seqs_per_member))
    ]
    with atomic_open(path, "wb") as f:
        write_tar_members(f, members)
    return sha256_file(path)


class _TarfileIndex:
    """Member access with the standard library (the `wids` interface subset ShardReader uses)."""

    def __init__(self, path: Path):
        self._f = open(path, "rb")
        try:
            with tarfile.open(fileobj=self._f, mode="r:") as tar:
                # NOTE: one entry per key: a task dataset's member also holds `{key}.mask.npy`
                # etc. (data_prep/task_prep.py); the rows are `{key}.npy`, as wids reads them.
                self._index = [
                    (m.name, m.offset_data, m.size)
                    for m in tar
                    if m.isfile() and m.name.split(".", 1)[-1] == "npy"
                ]
        except BaseException:
            self._f.close()
            raise

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict:
        name, offset, size = self._index[i]
        self._f.seek(offset)
        data = self._f.read(size)
        if len(data) != size:
            raise EOFError(f"member {name}: {len(data)} of {size} bytes")
        return {".npy": io.BytesIO(data), "__key__": name.split(".", 1)[0]}

    def close(self) -> None:
        self._f.close()


class ShardReader:
    """Indexed access to the members of one shard, checked against the manifest's counts.

    Every failure (missing file, truncated or corrupted tar, bad array) is an RdptDataError
    that names the shard.
    """

    def __init__(
        self,
        path: str | Path,
        sequences: int,
        seq_len: int,
        dtype: str,
        seqs_per_member: int,
        backend: str = "wids",
    ):
        self.path = Path(path)
        self.sequences = sequences
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        self.seqs_per_member = seqs_per_member
        self.num_members = -(-sequences // seqs_per_member)
        if not self.path.is_file():
            raise RdptDataError(f"shard missing: {self.path}")
        try:
            if backend == "wids":
                from wids.wids import IndexedTarSamples

                self._tar = IndexedTarSamples(path=str(self.path))
            else:
                self._tar = _TarfileIndex(self.path)
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

    def member_fields(self, m: int, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The other arrays stored under member `m`'s key (`mask.npy`, ... of a task dataset:
        data_prep/task_prep.py), wids backend only."""
        try:
            sample = self._tar[m]
            return {f: np.load(sample["." + f], allow_pickle=False) for f in fields}
        except Exception as e:
            raise RdptDataError(
                f"shard {self.path} member {m}: fields {list(fields)} missing or corrupted "
                f"({type(e).__name__}: {e})"
            ) from None

    def close(self) -> None:
        self._tar.close()
