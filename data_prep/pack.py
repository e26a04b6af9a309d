"""Phase 2 of `rdpt prep`: stream the encoded chunks in order, pack rows, write shards.

Layout (a contract, also in the README): per split, the token streams of all chunks are
concatenated in plan order -- every document's tokens followed by one end-of-text id. That
stream is cut into consecutive, non-overlapping rows of seq_len+1 tokens (row i = tokens
[i*(seq_len+1), (i+1)*(seq_len+1))); a model reads inputs row[:-1] and targets row[1:]. The last
row, if partial, is filled up with end-of-text ids and their number recorded as the split's
`padding_tokens`; no token is dropped. Rows go into shards of `rows_per_shard` rows (a multiple
of seqs_per_member, from shard_size_mb), each member holding seqs_per_member rows (the last
member of the split may hold fewer).

With `packing: document` (DocumentPacker) every row starts at a document start instead:
documents (each already wrapped in its begin/end tokens) are appended to the row being built
until it holds at least seq_len+1 tokens; the row is then the first seq_len+1 of them, and the
rest (the tail of its last document) is dropped and counted as `dropped_tokens` (tails: drop)
or starts the next row (tails: carry). The split's last row is padded with end tokens.

A shard that already exists under its final name is complete (atomic rename), so a restarted
pack only writes the missing shards; their bytes are identical because the stream is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.shards import write_shard
from pipeline.common.atomic import sha256_file


def rows_per_shard(seq_len: int, itemsize: int, shard_size_mb: float, seqs_per_member: int) -> int:
    row_bytes = (seq_len + 1) * itemsize
    rows = int(shard_size_mb * 2**20) // row_bytes
    return max(seqs_per_member, rows // seqs_per_member * seqs_per_member)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


class SplitPacker:
    """Packs one split's token stream into shards under `<output>/<split>/`."""

    def __init__(
        self,
        out_dir: Path,
        split: str,
        seq_len: int,
        dtype: np.dtype,
        eot_id: int,
        seqs_per_member: int,
        rows_per_shard: int,
    ):
        self.dir = out_dir / split
        self.split = split
        self.row = seq_len + 1
        self.dtype = dtype
        self.eot_id = eot_id
        self.spm = seqs_per_member
        self.rows_per_shard = rows_per_shard
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.tokens = 0
        self.documents = 0
        self.padding = 0
        self.shards: list[dict] = []
        self.written = 0  # shards written in this run (others existed already)

    def add(self, tokens: np.ndarray, documents: int) -> None:
        self.documents += documents
        self.tokens += tokens.size
        if tokens.size:
            self.pending.append(tokens)
            self.pending_tokens += tokens.size
        shard_tokens = self.rows_per_shard * self.row
        while self.pending_tokens >= shard_tokens:
            stream = np.concatenate(self.pending)
            self._emit(stream[:shard_tokens].reshape(-1, self.row))
            rest = stream[shard_tokens:]
            self.pending = [rest] if rest.size else []
            self.pending_tokens = rest.size

    def finish(self) -> dict:
        if self.pending_tokens:
            stream = np.concatenate(self.pending)
            self.padding = -stream.size % self.row
            if self.padding:
                fill = np.full(self.padding, self.eot_id, dtype=self.dtype)
                stream = np.concatenate([stream, fill])
            self._emit(stream.reshape(-1, self.row))
            self.pending, self.pending_tokens = [], 0
        return {
            "tokens": self.tokens,
            "padding_tokens": self.padding,
            "sequences": sum(s["sequences"] for s in self.shards),
            "documents": self.documents,
            "shards": self.shards,
        }

    def _emit(self, rows: np.ndarray) -> None:
        """Write (or, when it exists, re-hash) the next shard of `rows`."""
        index = len(self.shards)
        path = self.dir / shard_name(index)
        first_member = index * (self.rows_per_shard // self.spm)
        if path.exists():
            sha = sha256_file(path)
        else:
            sha = write_shard(path, rows, first_member, self.spm)
            self.written += 1
        self.shards.append(
            {
                "path": f"{self.split}/{shard_name(index)}",
                "sha256": sha,
                "sequences": int(rows.shape[0]),
                "bytes": path.stat().st_size,
            }
        )


class DocumentPacker(SplitPacker):
    """Rows that start at document starts (module docstring); `carry` keeps the tails."""

    def __init__(self, *args, carry: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.carry = carry
        self.current: list[np.ndarray] = []
        self.current_tokens = 0
        self.rows: list[np.ndarray] = []
        self.dropped = 0

    def add_documents(self, tokens: np.ndarray, doc_tokens: np.ndarray) -> None:
        """Append the documents of one chunk (`doc_tokens`: each one's length in `tokens`)."""
        self.documents += len(doc_tokens)
        self.tokens += tokens.size
        ends = np.cumsum(doc_tokens, dtype=np.int64)
        if ends.size and ends[-1] != tokens.size:
            raise ValueError("document lengths do not add up to the chunk's tokens")
        start = 0
        for end in ends.tolist():
            self.current.append(tokens[start:end])
            self.current_tokens += end - start
            start = end
            if self.current_tokens >= self.row:
                self._cut()
        while len(self.rows) >= self.rows_per_shard:
            self._emit(np.stack(self.rows[: self.rows_per_shard]))
            del self.rows[: self.rows_per_shard]

    def _cut(self) -> None:
        buf = np.concatenate(self.current)
        if self.carry:
            n = buf.size // self.row
            self.rows.extend(buf[: n * self.row].reshape(n, self.row))
            rest = buf[n * self.row :]
            self.current = [rest] if rest.size else []
            self.current_tokens = rest.size
        else:
            self.rows.append(buf[: self.row])
            self.dropped += buf.size - self.row
            self.current, self.current_tokens = [], 0

    def finish(self) -> dict:
        if self.current_tokens:
            buf = np.concatenate(self.current)
            self.padding = self.row - buf.size
            fill = np.full(self.padding, self.eot_id, dtype=self.dtype)
            self.rows.append(np.concatenate([buf, fill]))
            self.current, self.current_tokens = [], 0
        if self.rows:
            self._emit(np.stack(self.rows))
            self.rows = []
        return {
            "tokens": self.tokens,
            "dropped_tokens": self.dropped,
            "padding_tokens": self.padding,
            "sequences": sum(s["sequences"] for s in self.shards),
            "documents": self.documents,
            "shards": self.shards,
        }
