"""Phase 1 of `rdpt prep`: encode chunks of documents into token files, in parallel.

Each chunk i of the plan becomes `<output>/.work/chunk-{i:06d}.npz` (written atomically), with
per split (train, val) the token stream of its documents, each preceded by the begin token (if
configured) and followed by the end token, the token count of each document and a small JSON
record of bytes read and skips. Pre-tokenized files (Parquet, .npy) pass their ids through
(wrapped in begin/end tokens only with `wrap_pretokenized`). A chunk file
that exists is complete, so a restarted or parallel (Slurm array) run only encodes what is
missing. The content of a chunk depends only on the plan, never on which process encoded it.

Fault injection for tests: with RDPT_PREP_KILL_AFTER_CHUNKS=N in the environment the process
group is SIGKILLed once N chunks of this run are written (a crash at a known point).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from data_prep.sources import Skipped, SourceFile, is_val, iter_documents, iter_token_documents
from data_prep.tokenizer import make_encoder
from pipeline.common.atomic import atomic_open

SPLITS = ("train", "val")


def chunk_path(work_dir: Path, index: int) -> Path:
    return work_dir / f"chunk-{index:06d}.npz"


class ChunkEncoder:
    """Encodes chunks of one plan; built once per worker process."""

    def __init__(self, plan: dict, work_dir: str):
        self.plan = plan
        self.work_dir = Path(work_dir)
        self.sources = [SourceFile(**s) for s in plan["sources"]]
        self.encoder = make_encoder(self.work_dir / "tokenizer.json", kind=plan["encoder"])
        self.dtype = np.dtype(plan["dtype"])
        self.eot = np.array([plan["eot_id"]], dtype=self.dtype)
        bos = plan.get("bos_id")
        self.bos = np.array([bos], dtype=self.dtype) if bos is not None else None

    def _documents(self, pieces, skipped):
        """(file index, text or None, content bytes) in plan order; for a pre-tokenized file
        text is None and the ids are left in self._ids."""
        plan = self.plan
        for i, a, b in pieces:
            src = self.sources[i]
            if src.pretokenized:
                for ids in iter_token_documents(src, plan["token_column"], plan["vocab_size"]):
                    if not ids.size:
                        skipped.add(src.path, "empty")
                        continue
                    self._ids = ids
                    yield i, None, ids.astype("<u4").tobytes()
                continue
            yield from iter_documents(
                self.sources, [(i, a, b)], plan["text_field"], skipped, plan["strict"]
            )

    def encode(self, index: int) -> dict:
        """Encode chunk `index` and write its file; returns its summary."""
        plan = self.plan
        skipped = Skipped()
        parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        doc_tokens: dict[str, list[int]] = {s: [] for s in SPLITS}
        nbytes = {s: 0 for s in SPLITS}
        docs_per_file: dict[int, int] = {}
        pieces = [tuple(p) for p in plan["chunks"][index]]

        def add(split: str, ids: np.ndarray, wrap: bool) -> None:
            n = len(ids)
            if wrap and self.bos is not None:
                parts[split].append(self.bos)
                n += 1
            parts[split].append(ids.astype(self.dtype, copy=False))
            if wrap:
                parts[split].append(self.eot)
                n += 1
            doc_tokens[split].append(n)

        for file_index, text, data in self._documents(pieces, skipped):
            split = "val" if is_val(data, plan["val_fraction"], plan["split_seed"]) else "train"
            if text is None:  # pre-tokenized: the ids are the document
                add(split, self._ids, plan.get("wrap_pretokenized", False))
            else:
                add(split, self.encoder.encode_array(text), True)
                nbytes[split] += len(data)
            docs_per_file[file_index] = docs_per_file.get(file_index, 0) + 1
        meta = {
            "bytes": nbytes,
            "skipped": skipped.reasons,
            "skipped_examples": skipped.examples,
            "docs_per_file": {str(k): v for k, v in docs_per_file.items()},
        }
        arrays = {}
        for s in SPLITS:
            arrays[s] = np.concatenate(parts[s]) if parts[s] else np.zeros(0, self.dtype)
            arrays[f"{s}_doc_tokens"] = np.asarray(doc_tokens[s], dtype=np.uint32)
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with atomic_open(chunk_path(self.work_dir, index), "wb") as f:
            np.savez(f, **arrays)
        return {
            "index": index,
            "planned_bytes": plan["chunk_bytes"][index],
            "documents": sum(len(doc_tokens[s]) for s in SPLITS),
            "tokens": sum(int(arrays[s].size) for s in SPLITS),
            "bytes": sum(nbytes.values()),
        }


_WORKER: ChunkEncoder | None = None


def _init_worker(plan: dict, work_dir: str) -> None:
    global _WORKER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER = ChunkEncoder(plan, work_dir)


def _encode_in_worker(index: int) -> dict:
    assert _WORKER is not None
    return _WORKER.encode(index)


def encode_chunks(plan: dict, work_dir: Path, todo: list[int], workers: int, progress) -> None:
    """Encode chunks `todo` with `workers` processes; `progress.update(summary)` per chunk."""
    if not todo:
        return
    workers = max(1, min(workers, len(todo)))
    kill_after = int(os.environ.get("RDPT_PREP_KILL_AFTER_CHUNKS", "0"))
    done = 0

    def finished(summary) -> None:
        nonlocal done
        progress.update(summary)
        done += 1
        if kill_after and done >= kill_after:
            import signal

            os.killpg(os.getpgrp(), signal.SIGKILL)

    if workers == 1:
        enc = ChunkEncoder(plan, str(work_dir))
        for i in todo:
            finished(enc.encode(i))
        return
    # NOTE: spawn, not fork: the parent may hold threads (tokenizers' rayon pool after BPE
    # training, torch under pytest) that a forked child would inherit in a broken state.
    ctx = mp.get_context("spawn")
    # Biggest chunks first keeps the workers evenly loaded at the end.
    sizes = {i: plan["chunk_bytes"][i] for i in todo}
    ordered: Iterable[int] = sorted(todo, key=lambda i: (-sizes[i], i))
    with ctx.Pool(workers, initializer=_init_worker, initargs=(plan, str(work_dir))) as pool:
        for summary in pool.imap_unordered(_encode_in_worker, ordered):
            finished(summary)


def load_chunk(work_dir: Path, index: int) -> dict:
    """The arrays of one encoded chunk (+ its decoded meta record)."""
    with np.load(chunk_path(work_dir, index), allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    out["meta"] = json.loads(out["meta"].tobytes().decode())
    return out
