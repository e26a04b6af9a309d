"""`rdpt prep verify` and `rdpt prep inspect`: check a dataset against its manifest, and
print its statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_prep.progress import say
from data_prep.shards import ShardReader
from pipeline.common.atomic import sha256_file
from pipeline.common.errors import RdptDataError

SPLITS = ("train", "val", "test")  # test: task datasets (data_prep/task_prep.py)


def read_manifest(path: str | Path) -> dict:
    """The manifest of dataset directory `path` (RdptDataError if missing or unreadable)."""
    mpath = Path(path) / "manifest.json"
    if not mpath.is_file():
        raise RdptDataError(f"{path} is not a prepared dataset: {mpath} not found")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise RdptDataError(f"{mpath} is not valid JSON ({e})") from None
    for key in (
        "format_version",
        "seq_len",
        "dtype",
        "vocab_size",
        "eot_id",
        "seqs_per_member",
        "tokenizer",
        "splits",
    ):
        if key not in manifest:
            raise RdptDataError(f"{mpath}: key {key!r} missing")
    return manifest


def open_shard(root: Path, manifest: dict, shard: dict) -> ShardReader:
    return ShardReader(
        root / shard["path"],
        shard["sequences"],
        manifest["seq_len"],
        manifest["dtype"],
        manifest["seqs_per_member"],
        backend="tarfile",
    )


def iter_split_rows(root: Path, manifest: dict, split: str):
    """Yield (shard entry, member array) for every member of `split` in order."""
    for shard in manifest["splits"][split]["shards"]:
        reader = open_shard(root, manifest, shard)
        try:
            for m in range(reader.num_members):
                yield shard, reader.member(m)
        finally:
            reader.close()


def verify_dataset(path: str | Path, decode: int = 0, quiet: bool = False) -> dict:
    """Re-read every shard: sha256, member count, array shapes/dtype, token range and per-split
    totals against the manifest. Raises RdptDataError naming every bad shard."""
    root = Path(path)
    manifest = read_manifest(root)
    errors: list[str] = []
    tok = root / manifest["tokenizer"]["path"]
    if not tok.is_file():
        errors.append(f"tokenizer missing: {tok}")
    elif sha256_file(tok) != manifest["tokenizer"]["sha256"]:
        errors.append(f"tokenizer {tok}: sha256 differs from the manifest")
    report = {}
    for split in SPLITS:
        info = manifest["splits"].get(split)
        if info is None:
            continue
        sequences = 0
        for shard in info["shards"]:
            spath = root / shard["path"]
            if not spath.is_file():
                errors.append(f"shard missing: {spath}")
                continue
            if sha256_file(spath) != shard["sha256"]:
                errors.append(
                    f"shard {spath}: sha256 differs from the manifest (corrupted or "
                    f"truncated; {spath.stat().st_size} bytes, manifest says "
                    f"{shard.get('bytes', '?')})"
                )
                continue
            try:
                reader = open_shard(root, manifest, shard)
                for m in range(reader.num_members):
                    arr = reader.member(m)
                    if arr.size and int(arr.max()) >= manifest["vocab_size"]:
                        raise RdptDataError(
                            f"shard {spath} member {m}: token id {int(arr.max())} >= vocab_size"
                        )
                reader.close()
            except RdptDataError as e:
                errors.append(str(e))
                continue
            sequences += shard["sequences"]
        kept = info["tokens"] - info.get("dropped_tokens", 0) + info["padding_tokens"]
        want_rows = -(-kept // (manifest["seq_len"] + 1))
        if not errors and (sequences != info["sequences"] or sequences != want_rows):
            errors.append(
                f"split {split}: {sequences} sequences in shards, manifest says "
                f"{info['sequences']} (tokens imply {want_rows})"
            )
        report[split] = {"shards": len(info["shards"]), "sequences": sequences}
    if errors:
        raise RdptDataError(f"dataset {root} failed verification:\n  " + "\n  ".join(errors))
    if not quiet:
        parts = [
            f"{s}: {r['shards']} shards, {r['sequences']} sequences" for s, r in report.items()
        ]
        say(f"{root}: OK ({'; '.join(parts)})")
    if decode:
        print_decoded(root, manifest, decode)
    return report


def print_decoded(root: Path, manifest: dict, n: int) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(root / manifest["tokenizer"]["path"]))
    shown = 0
    for shard, member in iter_split_rows(root, manifest, "train"):
        for row in member:
            print(f"--- train sequence {shown} ({shard['path']}) ---")
            print(tok.decode(row.tolist(), skip_special_tokens=False))
            shown += 1
            if shown >= n:
                return


def inspect_dataset(path: str | Path, top: int = 20) -> dict:
    """Statistics: totals per split, document-length histogram (tokens), top tokens,
    compression (bytes of text per token)."""
    from rich.console import Console
    from rich.table import Table
    from tokenizers import Tokenizer

    root = Path(path)
    manifest = read_manifest(root)
    console = Console()
    table = Table(title=f"dataset {root}")
    for col in ("split", "documents", "tokens", "sequences", "shards", "MiB", "bytes/token"):
        table.add_column(col, justify="right" if col != "split" else "left")
    stats = manifest.get("stats", {})
    for split, info in manifest["splits"].items():
        table.add_row(
            split,
            f"{info['documents']:,}",
            f"{info['tokens']:,}",
            f"{info['sequences']:,}",
            str(len(info["shards"])),
            f"{sum(s.get('bytes', 0) for s in info['shards']) / 2**20:.1f}",
            str(stats.get("bytes_per_token", {}).get(split, "?")),
        )
    console.print(table)
    console.print(
        f"seq_len {manifest['seq_len']}, dtype {manifest['dtype']}, vocab "
        f"{manifest['vocab_size']}, eot {manifest['eot_id']}, "
        f"encoder {manifest['tokenizer'].get('encoder')}"
    )
    skipped = manifest.get("skipped", {}).get("counts", {})
    console.print(f"skipped inputs: {skipped or 'none'}")

    hist = stats.get("document_tokens_histogram")
    if hist:
        h = Table(title="document length (tokens, incl. end-of-text)")
        h.add_column("tokens")
        present = [s for s in SPLITS if s in manifest["splits"]]
        for split in present:
            h.add_column(split, justify="right")
        h.add_column("")
        edges = hist["edges"]
        peak = max(max(hist.get("train", [0]) or [0]), 1)
        for i in range(len(edges) - 1):
            counts = [hist.get(s, [0] * (len(edges) - 1))[i] for s in present]
            if not any(counts):
                continue
            bar = "#" * max(1, round(40 * counts[0] / peak)) if counts[0] else ""
            h.add_row(f"[{edges[i]}, {edges[i + 1]})", *map(str, counts), bar)
        console.print(h)

    counts = np.zeros(manifest["vocab_size"], dtype=np.int64)
    for _, member in iter_split_rows(root, manifest, "train"):
        counts += np.bincount(member.ravel(), minlength=manifest["vocab_size"])
    tok = Tokenizer.from_file(str(root / manifest["tokenizer"]["path"]))
    t = Table(title=f"top {top} tokens (train)")
    for col in ("id", "token", "count", "share"):
        t.add_column(col, justify="right" if col != "token" else "left")
    total = max(int(counts.sum()), 1)
    order = np.argsort(-counts, kind="stable")[:top]
    for i in order:
        t.add_row(
            str(int(i)),
            repr(tok.decode([int(i)], skip_special_tokens=False)),
            f"{int(counts[i]):,}",
            f"{counts[i] / total:.2%}",
        )
    console.print(t)
    return {"top_tokens": [int(i) for i in order], "manifest": manifest}
