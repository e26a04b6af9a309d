"""Reading prepared datasets (written by `rdpt prep`) for training and evaluation.

    from pipeline.data.loader import open_dataset, ResumableLoader, iterate_sequences
    info = open_dataset("data/corpus")                 # DatasetInfo (manifest, seq_len, ...)
    loader = ResumableLoader("data/corpus", split="train", micro_batch_size=4, grad_accum=2,
                             dp_rank=rank, dp_size=world, seed=1234)
    for step_batches in loader:                         # infinite; one item per optimizer step
        for mb in step_batches:                         # grad_accum MicroBatch(inputs, targets,
            ...                                         #   sample_ids)
    ckpt["data"] = loader.state_dict(); ...; loader.load_state_dict(ckpt["data"])

Order. For epoch e the split's sequences are ordered by a permutation that depends only on
(seed, e): the members (blocks of seqs_per_member consecutive sequences) are permuted, then
the sequences inside each member. Optimizer step k of an epoch consumes positions
[k*G, (k+1)*G) of that order, G = micro_batch_size * grad_accum * dp_size (the global batch);
rank r takes the contiguous slice [k*G + r*mb*ga, k*G + (r+1)*mb*ga), cut into grad_accum
micro-batches. So the global order never depends on dp_size, and a rank reads whole members.
The last G-1 positions of an epoch at most are left out (each epoch different ones).

Resume is a seek: the state is (epoch, position); the next step reads only the members it
needs through `wids` indexed tar access, never what was consumed. Shards are checked (sha256,
member count, array shape) the first time a loader opens them; a damaged shard raises
RdptDataError naming it.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from data_prep.shards import ShardReader
from data_prep.verify import read_manifest
from pipeline.common.atomic import sha256_file
from pipeline.common.errors import RdptDataError

STATE_VERSION = 1


@dataclass(frozen=True)
class DatasetInfo:
    """What training and evaluation need to know about a prepared dataset."""

    path: Path
    manifest: dict
    seq_len: int
    vocab_size: int
    eot_id: int
    tokenizer_path: Path
    manifest_sha256: str
    dtype: str
    pad_id: int | None = None

    def num_sequences(self, split: str = "train") -> int:
        return int(self.manifest["splits"][split]["sequences"])

    def num_tokens(self, split: str = "train") -> int:
        return int(self.manifest["splits"][split]["tokens"])


def open_dataset(path: str | Path) -> DatasetInfo:
    """Read and check a dataset's manifest (its tokenizer must match the recorded sha256)."""
    root = Path(path)
    manifest = read_manifest(root)
    tok = root / manifest["tokenizer"]["path"]
    if not tok.is_file():
        raise RdptDataError(f"dataset {root}: tokenizer {tok} missing")
    if sha256_file(tok) != manifest["tokenizer"]["sha256"]:
        raise RdptDataError(f"dataset {root}: tokenizer {tok} differs from the manifest's sha256")
    return DatasetInfo(
        path=root,
        manifest=manifest,
        seq_len=int(manifest["seq_len"]),
        vocab_size=int(manifest["vocab_size"]),
        eot_id=int(manifest["eot_id"]),
        tokenizer_path=tok,
        manifest_sha256=sha256_file(root / "manifest.json"),
        dtype=manifest["dtype"],
        pad_id=manifest.get("pad_id"),
    )


class MicroBatch(NamedTuple):
    inputs: torch.Tensor  # LongTensor [mb, seq_len]
    targets: torch.Tensor  # LongTensor [mb, seq_len]
    sample_ids: torch.Tensor  # LongTensor [mb]: global sequence ids within the split


class SplitReader:
    """Random access to the members of one split (a member = seqs_per_member sequences)."""

    def __init__(
        self,
        info: DatasetInfo,
        split: str,
        verify_shards: bool = True,
        max_open: int = 8,
        max_cached_members: int = 8,
    ):
        if split not in info.manifest["splits"]:
            raise RdptDataError(f"dataset {info.path} has no split {split!r}")
        self.info = info
        self.split = split
        self.verify_shards = verify_shards
        self.spm = int(info.manifest["seqs_per_member"])
        self.shards = info.manifest["splits"][split]["shards"]
        rows, shard_of, local = [], [], []
        for s, shard in enumerate(self.shards):
            n = int(shard["sequences"])
            for m in range(-(-n // self.spm)):
                rows.append(min(self.spm, n - m * self.spm))
                shard_of.append(s)
                local.append(m)
        self.member_rows = np.asarray(rows, dtype=np.int64)
        self.member_first = (
            np.concatenate([[0], np.cumsum(self.member_rows)[:-1]]).astype(np.int64)
            if rows
            else np.zeros(0, np.int64)
        )
        self.member_shard = np.asarray(shard_of, dtype=np.int64)
        self.member_local = np.asarray(local, dtype=np.int64)
        self.num_sequences = int(self.member_rows.sum())
        self._open: OrderedDict[int, ShardReader] = OrderedDict()
        self._verified: set[int] = set()
        self._members: OrderedDict[int, np.ndarray] = OrderedDict()
        self.max_open = max_open
        self.max_cached = max_cached_members
        self.members_read: list[int] = []  # every member decoded (tests check resume)

    @property
    def num_members(self) -> int:
        return len(self.member_rows)

    def _reader(self, s: int) -> ShardReader:
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        shard = self.shards[s]
        path = self.info.path / shard["path"]
        if self.verify_shards and s not in self._verified:
            if not path.is_file():
                raise RdptDataError(f"shard missing: {path}")
            if sha256_file(path) != shard["sha256"]:
                raise RdptDataError(
                    f"shard {path} is corrupted or truncated (sha256 differs from the manifest)"
                )
            self._verified.add(s)
        reader = ShardReader(
            path, int(shard["sequences"]), self.info.seq_len, self.info.dtype, self.spm
        )
        self._open[s] = reader
        if len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        return reader

    def member(self, m: int) -> np.ndarray:
        """Rows [n, seq_len+1] of member `m` (a small LRU avoids decoding it twice)."""
        if m in self._members:
            self._members.move_to_end(m)
            return self._members[m]
        arr = self._reader(int(self.member_shard[m])).member(int(self.member_local[m]))
        self.members_read.append(m)
        self._members[m] = arr
        if len(self._members) > self.max_cached:
            self._members.popitem(last=False)
        return arr

    def sequences(self, ids: np.ndarray) -> np.ndarray:
        """Rows for global sequence ids `ids` (any order) -> [len(ids), seq_len+1] int64."""
        out = np.empty((len(ids), self.info.seq_len + 1), dtype=np.int64)
        members = np.searchsorted(self.member_first, ids, side="right") - 1
        for i, (sid, m) in enumerate(zip(ids, members)):
            out[i] = self.member(int(m))[int(sid - self.member_first[m])]
        return out

    def close(self) -> None:
        for r in self._open.values():
            r.close()
        self._open.clear()
        self._members.clear()


class EpochOrder:
    """The permutation of one epoch, evaluated lazily: position -> global sequence id."""

    def __init__(self, reader: SplitReader, seed: int, epoch: int, shuffle: bool):
        self.reader, self.seed, self.epoch, self.shuffle = reader, seed, epoch, shuffle
        n = reader.num_members
        self.perm = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        self.ends = np.cumsum(reader.member_rows[self.perm])
        self._inner: dict[int, np.ndarray] = {}

    def _within(self, m: int) -> np.ndarray:
        if m not in self._inner:
            n = int(self.reader.member_rows[m])
            order = (
                np.random.default_rng([self.seed, self.epoch, m]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            if len(self._inner) > 64:
                self._inner.clear()
            self._inner[m] = order
        return self._inner[m]

    def ids(self, start: int, stop: int) -> np.ndarray:
        """Global sequence ids at positions [start, stop) of this epoch."""
        pos = np.arange(start, stop)
        slots = np.searchsorted(self.ends, pos, side="right")
        out = np.empty(len(pos), dtype=np.int64)
        for i, (p, slot) in enumerate(zip(pos, slots)):
            m = int(self.perm[slot])
            offset = int(p - (self.ends[slot - 1] if slot else 0))
            out[i] = self.reader.member_first[m] + self._within(m)[offset]
        return out


def _to_microbatch(rows: np.ndarray, ids: np.ndarray) -> MicroBatch:
    t = torch.from_numpy(rows)
    return MicroBatch(t[:, :-1].contiguous(), t[:, 1:].contiguous(), torch.from_numpy(ids))


class ResumableLoader:
    """Infinite, exactly resumable loader of optimizer steps (see the module docstring).

    Iterating yields, per optimizer step, a list of `grad_accum` MicroBatch for this rank.
    `state_dict()` describes what has been handed out so far; `load_state_dict()` makes the
    next iteration continue with the next unseen step. `prefetch` steps are read ahead in a
    background thread (0: read in the calling thread).
    """

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        *,
        micro_batch_size: int,
        grad_accum: int = 1,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        prefetch: int = 2,
        verify_shards: bool = True,
    ):
        if micro_batch_size < 1 or grad_accum < 1:
            raise RdptDataError("micro_batch_size and grad_accum must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise RdptDataError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.info = open_dataset(path)
        self.split = split
        self.mb, self.ga = micro_batch_size, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle, self.prefetch = seed, shuffle, prefetch
        self.reader = SplitReader(self.info, split, verify_shards=verify_shards)
        self.global_batch = micro_batch_size * grad_accum * dp_size
        if self.reader.num_sequences < self.global_batch:
            raise RdptDataError(
                f"dataset {self.info.path} split {split} has {self.reader.num_sequences} "
                f"sequences, fewer than one global batch ({self.global_batch})"
            )
        self.epoch = 0
        self.position = 0  # sequences of this epoch's order already handed out
        self.steps = 0  # steps handed out since the start of training
        self._order: EpochOrder | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.reader.num_sequences // self.global_batch

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "position": self.position,
            "steps": self.steps,
            "global_batch": self.global_batch,
            "num_sequences": self.reader.num_sequences,
            "manifest_sha256": self.info.manifest_sha256,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("split", "seed", "shuffle", "num_sequences", "manifest_sha256"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise RdptDataError(
                    f"loader state is for {key}={state[key]!r}, this loader has "
                    f"{key}={mine!r}: cannot resume the same data order"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.steps = int(state.get("steps", 0))

    # ------------------------------------------------------------------ iteration

    def _order_for(self, epoch: int) -> EpochOrder:
        if self._order is None or self._order.epoch != epoch:
            self._order = EpochOrder(self.reader, self.seed, epoch, self.shuffle)
        return self._order

    def _step(self, epoch: int, position: int) -> tuple[list[MicroBatch], int, int]:
        """The batches of the step starting at (epoch, position) and the cursor after it."""
        if position + self.global_batch > self.reader.num_sequences:
            epoch, position = epoch + 1, 0
        order = self._order_for(epoch)
        per_rank = self.mb * self.ga
        start = position + self.dp_rank * per_rank
        ids = order.ids(start, start + per_rank)
        rows = self.reader.sequences(ids)
        batches = [
            _to_microbatch(
                rows[i * self.mb : (i + 1) * self.mb], ids[i * self.mb : (i + 1) * self.mb]
            )
            for i in range(self.ga)
        ]
        return batches, epoch, position + self.global_batch

    def __iter__(self) -> Iterator[list[MicroBatch]]:
        if self.prefetch <= 0:
            while True:
                batches, self.epoch, self.position = self._step(self.epoch, self.position)
                self.steps += 1
                yield batches
        stop = threading.Event()
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)

        def put(item) -> None:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def produce(epoch: int, position: int) -> None:
            try:
                while not stop.is_set():
                    item = self._step(epoch, position)
                    _, epoch, position = item
                    put(item)
            except BaseException as e:  # handed to the consumer, which re-raises it
                put(e)

        thread = threading.Thread(
            target=produce, args=(self.epoch, self.position), name="rdpt-data-prefetch", daemon=True
        )
        thread.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                batches, self.epoch, self.position = item
                self.steps += 1
                yield batches
        finally:
            stop.set()
            thread.join(timeout=5)

    def close(self) -> None:
        self.reader.close()


def iterate_sequences(
    path: str | Path,
    split: str = "val",
    batch_size: int = 8,
    dp_rank: int = 0,
    dp_size: int = 1,
    max_sequences: int | None = None,
) -> Iterator[MicroBatch]:
    """Evaluation order: the first `max_sequences` sequences of `split` in stored order, rank r
    of dp_size taking the contiguous block [r*n//dp_size, (r+1)*n//dp_size); yields
    MicroBatch(inputs, targets, sample_ids) with LongTensors [<=batch_size, seq_len] (the last
    batch may be smaller). The sample ids are global sequence indices, so a random initial
    state seeded by them does not depend on the number of ranks."""
    info = open_dataset(path)
    reader = SplitReader(info, split)
    n = reader.num_sequences if max_sequences is None else min(max_sequences, reader.num_sequences)
    lo, hi = dp_rank * n // dp_size, (dp_rank + 1) * n // dp_size
    try:
        for start in range(lo, hi, batch_size):
            ids = np.arange(start, min(start + batch_size, hi), dtype=np.int64)
            t = torch.from_numpy(reader.sequences(ids))
            yield MicroBatch(t[:, :-1].contiguous(), t[:, 1:].contiguous(), torch.from_numpy(ids))
    finally:
        reader.close()
