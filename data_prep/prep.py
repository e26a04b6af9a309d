"""`rdpt prep`: the whole preparation of one dataset, resumable and splittable across tasks.

    setup   (once, under a file lock)  inputs -> plan (files, chunks), tokenizer  -> .work/
    encode  (phase 1, any process)     chunk i -> .work/chunk-{i:06d}.npz
    pack    (phase 2, one process)     chunks in order -> train/ val/ shards
    finish                             tokenizer.json, config.yaml, manifest.json (last), verify

`prepare(cfg)` runs all of it locally with `cfg.workers` processes. A Slurm job array runs
`prepare(cfg, task=(i, m))` in every task (setup + the chunks c with c % m == i) and one
`prepare(cfg, finalize=True)` job afterwards. The output is the same bytes either way.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from data_prep import tokenizer as tk
from data_prep.config import PrepConfig
from data_prep.encode import SPLITS, chunk_path, encode_chunks, load_chunk
from data_prep.pack import DocumentPacker, SplitPacker, rows_per_shard
from data_prep.progress import EncodeProgress, say
from data_prep.sources import (
    Skipped,
    SourceFile,
    chunk_size,
    expand_inputs,
    iter_documents,
    plan_chunks,
)
from pipeline.common.atomic import atomic_copy, atomic_write_json, atomic_write_text, sha256_file
from pipeline.common.config_io import save_resolved
from pipeline.common.errors import RdptDataError

FORMAT_VERSION = 1
LAYOUTS = {
    "stream": "per split: documents in input order, each between bos_id (if any) and eot_id, "
    "concatenated and cut into consecutive rows of seq_len+1 tokens (inputs row[:-1], targets "
    "row[1:]); the last row is filled with padding_tokens eot_id",
    "document": "per split: documents in input order, each between bos_id (if any) and eot_id; "
    "every row of seq_len+1 tokens starts at a document start and holds whole documents until "
    "the last one overhangs: its tail is dropped (tails=drop, counted as dropped_tokens) or "
    "starts the next row (tails=carry); the last row is filled with padding_tokens eot_id",
}
MANIFEST = "manifest.json"
WORK = ".work"
OWNED = (MANIFEST, "config.yaml", "tokenizer.json", "train", "val", WORK)
LOCK = ".prep.lock"  # serialises setup between the tasks of a job array
PROBE_BYTES = 128 * 1024  # text on which tiktoken must match tokenizers exactly


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------- identity


def fingerprint(cfg: PrepConfig, sources: list[SourceFile]) -> str:
    """What determines the output bytes: the output-relevant config, every input file's path,
    size and mtime, and the given tokenizer file's content."""
    ident = {
        "format_version": FORMAT_VERSION,
        "config": cfg.fingerprint_fields(),
        "sources": [[s.path, s.size, s.mtime_ns] for s in sources],
        "tokenizer_sha256": sha256_file(cfg.tokenizer.path) if cfg.tokenizer.path else None,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _clear(out: Path) -> None:
    # NOTE: the manifest goes first, so a half-cleared directory never looks finished.
    (out / MANIFEST).unlink(missing_ok=True)
    for name in OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def check_output(out: Path, fp: str, overwrite: bool) -> str:
    """'done' (identical dataset already there), 'resume' (same unfinished dataset) or 'fresh'.
    Refuses to touch a directory holding a different dataset unless `overwrite`, and never
    deletes files that `rdpt prep` did not write. Called under the output's lock."""
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWNED + (LOCK,))
    if foreign:
        raise RdptDataError(
            f"output {out} is not empty and holds files rdpt prep did not write "
            f"({', '.join(foreign[:5])}{'...' if len(foreign) > 5 else ''}); choose another "
            "output directory"
        )
    manifest, plan = out / MANIFEST, out / WORK / "plan.json"
    for path, what in (
        (manifest, "a different dataset"),
        (plan, "an unfinished preparation of a different dataset"),
    ):
        if not path.is_file():
            continue
        if _fingerprint_of(path) == fp:
            return "done" if path == manifest else "resume"
        if not overwrite:
            raise RdptDataError(
                f"output {out} already holds {what} (other config or inputs); pass --overwrite "
                "(or overwrite=true) to replace it"
            )
        _clear(out)
        return "fresh"
    return "fresh"  # empty, or leftovers of an interrupted setup (redone under the lock)


def _fingerprint_of(path: Path) -> str | None:
    """The fingerprint recorded in a manifest or plan file (None if absent or unreadable)."""
    try:
        return json.loads(path.read_text()).get("fingerprint")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------- setup


def _training_text(cfg: PrepConfig, sources: list[SourceFile], limit: int) -> Iterator[str]:
    """The first `limit` bytes of documents, in order (what the BPE is trained on)."""
    pieces = [(i, 0, -1) for i in range(len(sources))]
    seen = 0
    for _, text, _ in iter_documents(sources, pieces, cfg.text_field, Skipped(), strict=False):
        yield text
        seen += len(text)
        if seen >= limit:
            return


def setup(cfg: PrepConfig, out: Path, sources: list[SourceFile], fp: str) -> dict:
    """Create (or load) `.work/plan.json` and `.work/tokenizer.json`. Called under the
    output's lock, so among many tasks exactly one trains the tokenizer."""
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    plan_path = work / "plan.json"
    if plan_path.is_file():
        return json.loads(plan_path.read_text())
    tok_path = work / "tokenizer.json"
    t0 = time.monotonic()
    pretokenized = [src.path for src in sources if src.pretokenized]
    if pretokenized and not cfg.tokenizer.path:
        raise RdptDataError(
            f"pre-tokenized input {pretokenized[0]} needs tokenizer.path: the tokenizer.json "
            "its ids come from (recorded with the dataset for decoding and evaluation)"
        )
    if cfg.tokenizer.path:
        if not Path(cfg.tokenizer.path).is_file():
            raise RdptDataError(f"tokenizer.path: {cfg.tokenizer.path} does not exist")
        atomic_copy(cfg.tokenizer.path, tok_path)
        say(f"tokenizer: {cfg.tokenizer.path}")
    else:
        say(
            f"training a byte-level BPE (vocab {cfg.tokenizer.vocab_size}) on up to "
            f"{cfg.tokenizer.train_max_bytes / 2**20:.0f} MiB of the input ..."
        )
        tok = tk.train_bpe(
            _training_text(cfg, sources, cfg.tokenizer.train_max_bytes),
            cfg.tokenizer.vocab_size,
            cfg.tokenizer.special_tokens,
            cfg.tokenizer.min_frequency,
        )
        tmp = work / ".tmp-tokenizer.json"
        tok.save(str(tmp))
        os.replace(tmp, tok_path)
        say(f"  trained in {time.monotonic() - t0:.1f} s")
    hf = tk.load_hf(tok_path)
    specials = tk.special_ids(hf)
    where = cfg.tokenizer.path or "the trained tokenizer"
    for key in ("end_token", "begin_token"):
        token = getattr(cfg.tokenizer, key)
        if token is not None and token not in specials:
            raise RdptDataError(
                f"tokenizer.{key}: {token!r} is not a special token of {where} (its special "
                f"tokens: {', '.join(list(specials)[:12]) or 'none'}); set tokenizer.{key} to "
                "one of them"
            )
    vocab_size = hf.get_vocab_size(with_added_tokens=True)
    probe = "".join(_training_text(cfg, sources, PROBE_BYTES))
    encoder = tk.make_encoder(tok_path, cfg.tokenizer.encoder, probe_text=probe, hf=hf)
    chunks = plan_chunks(sources, int(cfg.chunk_mb * 2**20))
    plan = {
        "fingerprint": fp,
        "sources": [vars(s) for s in sources],
        "chunks": chunks,
        "chunk_bytes": [chunk_size(sources, c) for c in chunks],
        "tokenizer_sha256": sha256_file(tok_path),
        "encoder": encoder.name,
        "dtype": "uint16" if vocab_size <= 2**16 else "uint32",
        "vocab_size": vocab_size,
        "eot_id": specials[cfg.tokenizer.end_token],
        "bos_id": specials.get(cfg.tokenizer.begin_token) if cfg.tokenizer.begin_token else None,
        "pad_id": specials.get(tk.PAD),
        "token_column": cfg.token_column,
        "wrap_pretokenized": cfg.wrap_pretokenized,
        "special_tokens": specials,
        "text_field": cfg.text_field,
        "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed,
        "strict": cfg.strict,
    }
    # compact JSON: the C encoder (indent=... falls back to pure Python; plans are large)
    atomic_write_text(plan_path, json.dumps(plan, separators=(",", ":")))
    return plan


# ---------------------------------------------------------------------------- phases


def encode_phase(plan: dict, out: Path, workers: int, task: tuple[int, int] | None) -> int:
    """Encode the missing chunks (of this task); returns how many were encoded."""
    work = out / WORK
    n = len(plan["chunks"])
    mine = range(n) if task is None else range(task[0], n, task[1])
    todo = [i for i in mine if not chunk_path(work, i).exists()]
    done = len(mine) - len(todo)
    label = "encode" if task is None else f"encode task {task[0]}/{task[1]}"
    say(
        f"{label}: {len(todo)} of {len(mine)} chunks to encode"
        f"{f' ({done} already done)' if done else ''}, {min(workers, max(len(todo), 1))} "
        f"worker(s), encoder {plan['encoder']}"
    )
    progress = EncodeProgress(sum(plan["chunk_bytes"][i] for i in todo), label)
    encode_chunks(plan, work, todo, workers, progress)
    elapsed = progress.close()
    if todo:
        say(
            f"{label}: {progress.docs} documents, {progress.tokens / 1e6:.2f} M tokens in "
            f"{elapsed:.1f} s ({progress.tokens / max(elapsed, 1e-9) / 1e6:.2f} M tokens/s)"
        )
    return len(todo)


def missing_chunks(plan: dict, out: Path) -> list[int]:
    return [i for i in range(len(plan["chunks"])) if not chunk_path(out / WORK, i).exists()]


def _log2_edges(lengths: list[np.ndarray]) -> list[int]:
    """Histogram bin edges 0, 1, 2, 4, ... up to the longest document."""
    top = max((int(a.max()) for a in lengths if a.size), default=1)
    return [0] + [2**k for k in range(0, int(np.ceil(np.log2(top + 1))) + 1)]


def pack_phase(cfg: PrepConfig, plan: dict, out: Path) -> dict:
    """Stream all chunks in order into both splits' shards; returns the manifest body."""
    work = out / WORK
    dtype = np.dtype(plan["dtype"])
    rps = rows_per_shard(cfg.seq_len, dtype.itemsize, cfg.shard_size_mb, cfg.seqs_per_member)
    args = (cfg.seq_len, dtype, plan["eot_id"], cfg.seqs_per_member, rps)
    if cfg.packing == "document":
        carry = cfg.tails == "carry"
        packers = {s: DocumentPacker(out, s, *args, carry=carry) for s in SPLITS}
    else:
        packers = {s: SplitPacker(out, s, *args) for s in SPLITS}
    skipped = Skipped()
    doc_tokens: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    nbytes = {s: 0 for s in SPLITS}
    docs_per_file: dict[int, int] = {}
    t0 = time.monotonic()
    for i in range(len(plan["chunks"])):
        chunk = load_chunk(work, i)
        meta = chunk["meta"]
        for s in SPLITS:
            if cfg.packing == "document":
                packers[s].add_documents(chunk[s], chunk[f"{s}_doc_tokens"])
            else:
                packers[s].add(chunk[s], len(chunk[f"{s}_doc_tokens"]))
            doc_tokens[s].append(chunk[f"{s}_doc_tokens"])
            nbytes[s] += meta["bytes"][s]
        for reason, count in meta["skipped"].items():
            skipped.reasons[reason] = skipped.reasons.get(reason, 0) + count
        skipped.examples.extend(meta["skipped_examples"][: 200 - len(skipped.examples)])
        for k, v in meta["docs_per_file"].items():
            docs_per_file[int(k)] = v
    splits = {s: packers[s].finish() for s in SPLITS}
    written = sum(p.written for p in packers.values())
    say(f"pack: {written} shard(s) written in {time.monotonic() - t0:.1f} s")
    total_docs = sum(splits[s]["documents"] for s in SPLITS)
    if total_docs == 0:
        raise RdptDataError(
            f"input is empty: no document survived reading (skipped: {skipped.reasons or 'none'})"
        )
    edges = _log2_edges([a for s in SPLITS for a in doc_tokens[s]])
    hist = {"edges": edges}
    for s in SPLITS:
        data = np.concatenate(doc_tokens[s]) if doc_tokens[s] else np.zeros(0)
        hist[s] = [int(c) for c in np.histogram(data, bins=edges)[0]]
    return {
        "rows_per_shard": rps,
        "splits": splits,
        "sources": [
            {"path": s["path"], "bytes": s["size"], "documents": docs_per_file.get(i, 0)}
            for i, s in enumerate(plan["sources"])
        ],
        "skipped": {"counts": skipped.reasons, "examples": skipped.examples},
        "stats": {
            "text_bytes": nbytes,
            "bytes_per_token": {
                s: round(nbytes[s] / max(splits[s]["tokens"] - splits[s]["documents"], 1), 4)
                for s in SPLITS
            },
            "document_tokens_histogram": hist,
        },
    }


def finish(cfg: PrepConfig, plan: dict, out: Path, body: dict) -> dict:
    """Tokenizer, config and (last) the manifest; then the work directory goes away."""
    atomic_copy(out / WORK / "tokenizer.json", out / "tokenizer.json")
    saved = cfg.model_copy(update={"workers": None, "overwrite": False})
    save_resolved(saved, out / "config.yaml")
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": plan["fingerprint"],
        "seq_len": cfg.seq_len,
        "dtype": plan["dtype"],
        "vocab_size": plan["vocab_size"],
        "eot_id": plan["eot_id"],
        "bos_id": plan.get("bos_id"),
        "pad_id": plan["pad_id"],
        "document_tokens": {
            "begin": cfg.tokenizer.begin_token,
            "end": cfg.tokenizer.end_token,
            "pretokenized_wrapped": cfg.wrap_pretokenized,
        },
        "packing": cfg.packing,
        "tails": cfg.tails if cfg.packing == "document" else None,
        "seqs_per_member": cfg.seqs_per_member,
        "rows_per_shard": body.pop("rows_per_shard"),
        "layout": LAYOUTS[cfg.packing]
        + "; member {m:010d}.npy holds rows [m*seqs_per_member, (m+1)*seqs_per_member) of the "
        "split",
        "tokenizer": {
            "path": "tokenizer.json",
            "sha256": plan["tokenizer_sha256"],
            "encoder": plan["encoder"],
            "special_tokens": plan["special_tokens"],
        },
        "config": "config.yaml",
        **body,
    }
    _make_readable(out)
    atomic_write_json(out / MANIFEST, manifest)
    _make_readable(out / MANIFEST)
    return manifest


def _make_readable(path: Path) -> None:
    """Temporary files are created 0600; a dataset is shared: rw-r--r-- (less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        if WORK not in p.parts:
            os.chmod(p, 0o666 & ~umask)


# ---------------------------------------------------------------------------- entry point


def prepare(
    cfg: PrepConfig,
    *,
    task: tuple[int, int] | None = None,
    finalize: bool = False,
    verify: bool = True,
) -> dict | None:
    """Prepare the dataset of `cfg` (see the module docstring). Returns the manifest (None
    for an encode task)."""
    from data_prep.verify import verify_dataset

    if not cfg.output:
        raise RdptDataError("no output directory given (set `output:` or pass --output DIR)")
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise RdptDataError(f"output {out} exists and is not a directory")
    sources = expand_inputs(cfg.inputs, cfg.extensions, cfg.limit_bytes)
    fp = fingerprint(cfg, sources)
    if finalize and not (out / MANIFEST).is_file() and not (out / WORK / "plan.json").is_file():
        raise RdptDataError(
            f"--finalize: {out} has no encoded chunks of this dataset yet; run the encode "
            "tasks first (rdpt prep CONFIG --task-index I --num-tasks M)"
        )
    out.mkdir(parents=True, exist_ok=True)
    # NOTE: a finished dataset is recognised before taking the lock, so a no-op re-run
    # writes nothing at all into the dataset directory.
    if _fingerprint_of(out / MANIFEST) == fp:
        say(f"{out}: already prepared with this config and these inputs; nothing to do")
        return json.loads((out / MANIFEST).read_text())
    with _locked(out / LOCK):
        state = check_output(out, fp, cfg.overwrite)
        if state == "done":
            say(f"{out}: already prepared with this config and these inputs; nothing to do")
            return json.loads((out / MANIFEST).read_text())
        if finalize and state != "resume":
            raise RdptDataError(f"--finalize: {out} holds no encoded chunks of this dataset")
        if state == "resume" and not finalize and task is None:
            say(f"{out}: resuming an interrupted preparation")
        plan = setup(cfg, out, sources, fp)
    if finalize:
        missing = missing_chunks(plan, out)
        if missing:
            shown = ", ".join(str(i) for i in missing[:20])
            raise RdptDataError(
                f"--finalize: {len(missing)} of {len(plan['chunks'])} chunks are not encoded yet "
                f"(chunk {shown}{' ...' if len(missing) > 20 else ''}, files "
                f"{chunk_path(out / WORK, missing[0])} ...); re-run the tasks that own them"
            )
    else:
        workers = cfg.workers or default_workers()
        if task is not None:
            encode_phase(plan, out, workers, task)
            left = len(missing_chunks(plan, out))
            say(
                f"task {task[0]}/{task[1]} done; {left} chunk(s) of other tasks still missing; "
                "when all tasks are done run: rdpt prep CONFIG --finalize"
            )
            return None
        encode_phase(plan, out, workers, None)
    body = pack_phase(cfg, plan, out)
    manifest = finish(cfg, plan, out, body)
    if verify:
        verify_dataset(out)
    shutil.rmtree(out / WORK, ignore_errors=True)
    (out / LOCK).unlink(missing_ok=True)
    return manifest
