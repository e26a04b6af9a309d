"""Input files -> an ordered list of documents, cut into fixed encode chunks.

Order is deterministic: inputs in the order given; a directory is walked recursively in sorted
path order (hidden entries skipped, files filtered by extension); a glob's matches are sorted;
a file named twice is read once. Plain-text files are one document each; JSON Lines files
(`.jsonl`, `.jsonl.gz`, `.jsonl.zst`) hold one document per line in field `text_field`.

Chunks (the unit of encode work, of resume and of Slurm array tasks) depend only on the file
list, the file sizes and `chunk_mb`, never on the worker count: consecutive files are grouped
until a chunk holds `chunk_mb`; an uncompressed JSON Lines file larger than that is cut into
byte ranges, and a line belongs to the range in which it *starts*.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.common.errors import RdptDataError

STDLIB = "@stdlib"  # input placeholder: the running interpreter's standard-library sources
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TOKEN_SUFFIXES = (".parquet", ".npy")  # pre-tokenized: token ids, no text


@dataclass(frozen=True)
class SourceFile:
    path: str
    size: int
    mtime_ns: int

    @property
    def kind(self) -> str:
        name = self.path.lower()
        for suffix in JSONL_SUFFIXES + TOKEN_SUFFIXES:
            if name.endswith(suffix):
                return suffix[1:]
        return "text"

    @property
    def pretokenized(self) -> bool:
        return self.kind in ("parquet", "npy")


@dataclass
class Skipped:
    """Counted, reported skips (never silent)."""

    reasons: dict[str, int] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)

    def add(self, path: str, reason: str, where: str = "") -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.examples) < 200:
            entry = {"path": path, "reason": reason}
            if where:
                entry["at"] = where
            self.examples.append(entry)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    """The interpreter's standard-library `.py` sources, site-packages excluded, sorted."""
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in ("site-packages", "dist-packages", "__pycache__") and not d.startswith(".")
        )
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return out


def _walk(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and f.lower().endswith(extensions):
                out.append(Path(dirpath) / f)
    return out


def expand_inputs(
    inputs: list[str], extensions: list[str], limit_bytes: int | None = None
) -> list[SourceFile]:
    """Resolve files, directories, globs and "@stdlib" into an ordered, de-duplicated list."""
    if not inputs:
        raise RdptDataError("no inputs given (set `inputs:` or pass --input PATH ...)")
    exts = tuple(e.lower() for e in extensions)
    paths: list[Path] = []
    for spec in inputs:
        if spec == STDLIB:
            paths.extend(_stdlib_files())
            continue
        p = Path(spec).expanduser()
        if p.is_file():
            paths.append(p)
        elif p.is_dir():
            found = _walk(p, exts)
            if not found:
                raise RdptDataError(
                    f"input directory {spec} holds no files with extensions {', '.join(exts)}"
                )
            paths.extend(found)
        elif any(c in spec for c in "*?["):
            found = [Path(m) for m in sorted(glob.glob(os.path.expanduser(spec), recursive=True))]
            found = [m for m in found if m.is_file()]
            if not found:
                raise RdptDataError(f"input glob {spec!r} matches no files")
            paths.extend(found)
        else:
            raise RdptDataError(f"input path not found: {spec}")
    seen: set[str] = set()
    out: list[SourceFile] = []
    total = 0
    for p in map(str, paths):
        key = os.path.realpath(p)
        if key in seen:
            continue
        seen.add(key)
        st = os.stat(p)
        out.append(SourceFile(os.path.abspath(p), st.st_size, st.st_mtime_ns))
        total += st.st_size
        if limit_bytes is not None and total >= limit_bytes:
            break
    if sum(s.size for s in out) == 0:
        raise RdptDataError(f"input is empty: {len(out)} file(s), 0 bytes ({', '.join(inputs)})")
    return out


# ---------------------------------------------------------------------------- chunk plan

# A piece is (file index, start byte, end byte); end == -1 means the whole file.
Piece = tuple[int, int, int]


def plan_chunks(sources: list[SourceFile], chunk_bytes: int) -> list[list[Piece]]:
    """Group consecutive files (or line-aligned byte ranges of big JSON Lines files) into
    chunks of about `chunk_bytes`. Depends only on the file list and sizes."""
    chunks: list[list[Piece]] = []
    current: list[Piece] = []
    size = 0
    for i, src in enumerate(sources):
        if src.kind == "jsonl" and src.size > chunk_bytes:
            starts = range(0, src.size, chunk_bytes)
            pieces = [(i, a, min(a + chunk_bytes, src.size)) for a in starts]
            sizes = [b - a for _, a, b in pieces]
        else:
            pieces, sizes = [(i, 0, -1)], [src.size]
        for piece, n in zip(pieces, sizes):
            current.append(piece)
            size += n
            if size >= chunk_bytes:
                chunks.append(current)
                current, size = [], 0
    if current:
        chunks.append(current)
    return chunks


def chunk_size(sources: list[SourceFile], chunk: list[Piece]) -> int:
    return sum(sources[i].size if b < 0 else b - a for i, a, b in chunk)


# ---------------------------------------------------------------------------- documents


def _decode(data: bytes, path: str, where: str, skipped: Skipped, strict: bool) -> str | None:
    if b"\x00" in data:
        reason = "binary"
    else:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            reason = "not UTF-8"
    if strict:
        raise RdptDataError(f"{path}{' ' + where if where else ''}: {reason} (--strict)")
    skipped.add(path, reason, where)
    return None


def _open_jsonl(path: str, kind: str) -> io.BufferedIOBase:
    if kind == "jsonl.gz":
        return gzip.open(path, "rb")
    if kind == "jsonl.zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def _jsonl_lines(src: SourceFile, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset or line number, line) for the lines that start in [start, end)."""
    if src.kind != "jsonl" or end < 0:
        try:
            with _open_jsonl(src.path, src.kind) as f:
                for lineno, line in enumerate(f, 1):
                    yield lineno, line
        except (OSError, EOFError) as e:
            raise RdptDataError(f"{src.path}: cannot decompress ({e})") from None
        return
    with open(src.path, "rb") as f:
        pos = start
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":  # the line crossing `start` belongs to the previous range
                pos = start + len(f.readline())
        f.seek(pos)
        while pos < end:
            line = f.readline()
            if not line:
                break
            yield pos, line
            pos += len(line)


def iter_documents(
    sources: list[SourceFile],
    pieces: list[Piece],
    text_field: str,
    skipped: Skipped,
    strict: bool,
) -> Iterator[tuple[int, str, bytes]]:
    """(file index, text, its UTF-8 bytes) for every document of `pieces`, in order. Empty
    documents, binary and non-UTF-8 files, bad JSON lines are skipped and counted (or raise
    with `strict`)."""
    for i, a, b in pieces:
        src = sources[i]
        if src.pretokenized:  # token ids: read by iter_token_documents
            continue
        if src.kind == "text":
            try:
                data = Path(src.path).read_bytes()
            except OSError as e:
                raise RdptDataError(f"cannot read input {src.path}: {e}") from None
            text = _decode(data, src.path, "", skipped, strict)
            if text is None:
                continue
            if not text:
                skipped.add(src.path, "empty")
                continue
            yield i, text, data
            continue
        for where, line in _jsonl_lines(src, a, b):
            if not line.strip():
                continue
            loc = f"line {where}" if src.kind != "jsonl" or b < 0 else f"byte {where}"
            raw = _decode(line, src.path, loc, skipped, strict)
            if raw is None:
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                if strict:
                    raise RdptDataError(f"{src.path} {loc}: not valid JSON (--strict)") from None
                skipped.add(src.path, "bad JSON line", loc)
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                if strict:
                    raise RdptDataError(
                        f"{src.path} {loc}: no string field {text_field!r} (--strict)"
                    )
                skipped.add(src.path, f"no text field {text_field!r}", loc)
                continue
            if not text:
                skipped.add(src.path, "empty", loc)
                continue
            yield i, text, text.encode("utf-8")


def is_val(text: str | bytes, val_fraction: float, split_seed: int) -> bool:
    """Stable train/val assignment from a hash of the document's content (its UTF-8 bytes)
    keyed by the seed: identical documents always land in the same split, whatever the file
    order or worker count."""
    if val_fraction <= 0.0:
        return False
    data = text.encode("utf-8") if isinstance(text, str) else text
    key = (split_seed % 2**64).to_bytes(8, "little")
    h = hashlib.blake2b(data, digest_size=8, key=key)
    return int.from_bytes(h.digest(), "little") < val_fraction * 2.0**64


# ---------------------------------------------------------------------------- token documents


def iter_token_documents(src: SourceFile, column: str, vocab_size: int) -> Iterator[np.ndarray]:
    """The documents of a pre-tokenized file as int64 id arrays, in row order: a Parquet
    file's `column` (a list of integers per row) or a `.npy` array (1-D: one document; 2-D: one
    per row). Wrong types and ids outside [0, vocab_size) raise RdptDataError naming the file
    and the row."""
    if src.kind == "npy":
        try:
            arr = np.load(src.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise RdptDataError(f"{src.path}: not a readable .npy token file ({e})") from None
        if arr.dtype.kind not in "iu" or arr.ndim not in (1, 2):
            raise RdptDataError(
                f"{src.path}: a .npy token file must be a 1-D or 2-D integer array, got "
                f"{arr.ndim}-D {arr.dtype}"
            )
        rows = [arr] if arr.ndim == 1 else arr
        for r, row in enumerate(rows):
            ids = np.asarray(row, dtype=np.int64)
            _check_ids(ids, vocab_size, src.path, f"row {r}" if arr.ndim == 2 else "array")
            yield ids
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(src.path)
    except (OSError, pa.ArrowException) as e:
        raise RdptDataError(f"{src.path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise RdptDataError(
            f"{src.path}: no column {column!r} (columns: {', '.join(names)}); set token_column"
        )
    typ = pf.schema_arrow.field(column).type
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)) or not pa.types.is_integer(
        typ.value_type
    ):
        raise RdptDataError(
            f"{src.path}: column {column!r} is {typ}, not a list of integers (token ids)"
        )
    row = 0
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        col = batch.column(0)
        offsets = np.asarray(col.offsets)
        values = np.asarray(col.values.fill_null(-1), dtype=np.int64)
        valid = np.asarray(col.is_valid())
        for j in range(len(col)):
            if not valid[j]:
                raise RdptDataError(f"{src.path} row {row}: {column!r} is null")
            ids = values[offsets[j] : offsets[j + 1]]
            _check_ids(ids, vocab_size, src.path, f"row {row}")
            yield ids
            row += 1


def _check_ids(ids: np.ndarray, vocab_size: int, path: str, where: str) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
        raise RdptDataError(
            f"{path} {where}: token id {bad} is outside the tokenizer's vocabulary "
            f"[0, {vocab_size}) (is tokenizer.path the tokenizer these ids come from?)"
        )
