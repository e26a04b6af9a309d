"""`rdpt prep`: tokenizer equivalence, round trip, determinism across workers and Slurm-style
tasks, kill -9 resume, re-runs, verify/inspect. Real files, real tokenizers, real shards."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_prep.config import PrepConfig
from data_prep.prep import prepare
from data_prep.sources import expand_inputs, is_val, stdlib_root
from data_prep.verify import verify_dataset
from pipeline.cli import main as rdpt
from pipeline.common.errors import RdptDataError

from fixtures_data import stdlib_subset

ROOT = Path(__file__).resolve().parent.parent

NON_ASCII = [
    "Grüße aus Köln: Äpfel, Öl und Straße — ßẞ.\n",
    "日本語のテキスト、中文文本，한국어 텍스트。\n",
    "Emoji 🙂🚀 and combining e\u0301 and RTL עברית العربية\n",
    "Ελληνικά και кириллица, tabs\tand\r\nCRLF line ends   \n\n",
]


def dataset_files(d: Path) -> dict[str, bytes]:
    """Everything that must be byte-identical between two preparations of one dataset."""
    names = ["manifest.json", "tokenizer.json"]
    names += sorted(str(p.relative_to(d)) for p in d.glob("*/shard-*.tar"))
    return {n: (d / n).read_bytes() for n in names}


def make_corpus(root: Path) -> list[str]:
    """Text files (with non-ASCII), JSON Lines (plain, gzip, zstd); returns the documents in
    input order."""
    import zstandard

    root.mkdir(parents=True)
    docs = []
    src = stdlib_root() / "json"
    for i, p in enumerate(sorted(src.glob("*.py"))):
        text = p.read_text(encoding="utf-8") + NON_ASCII[i % len(NON_ASCII)]
        (root / f"a{i:02d}.py").write_text(text, encoding="utf-8")
        docs.append(text)
    records = [{"text": t * (k + 1), "id": k} for k, t in enumerate(NON_ASCII)]
    lines = "".join(json.dumps(r, ensure_ascii=k % 2 == 0) + "\n" for k, r in enumerate(records))
    (root / "b.jsonl").write_text(lines, encoding="utf-8")
    (root / "c.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (root / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    docs += [r["text"] for r in records] * 3
    return docs


def decode_split(d: Path, split: str) -> list[str]:
    """Decode every sequence of `split` with the dataset's own tokenizer.json (HF tokenizers),
    cut the stream at end-of-text ids, drop the padding."""
    from tokenizers import Tokenizer

    m = json.loads((d / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    rows = []
    for shard in m["splits"][split]["shards"]:
        import tarfile

        with tarfile.open(d / shard["path"]) as tf:
            for member in tf.getmembers():
                arr = np.load(io.BytesIO(tf.extractfile(member).read()), allow_pickle=False)
                assert arr.shape[1] == m["seq_len"] + 1 and arr.dtype == np.dtype(m["dtype"])
                rows.append(arr)
    stream = np.concatenate(rows).ravel() if rows else np.zeros(0, np.int64)
    info = m["splits"][split]
    assert stream.size == info["tokens"] + info["padding_tokens"]
    assert (stream[info["tokens"] :] == m["eot_id"]).all()
    stream = stream[: info["tokens"]]
    assert stream.size == 0 or stream[-1] == m["eot_id"]
    cuts = np.flatnonzero(stream == m["eot_id"])
    docs, start = [], 0
    for c in cuts:
        docs.append(tok.decode(stream[start:c].tolist(), skip_special_tokens=False))
        start = c + 1
    return docs


def test_tiktoken_encoder_matches_tokenizers_on_real_text(tmp_path, caplog):
    """The fast encoder gives exactly the ids of the Hugging Face tokenizer it was built from."""
    from tokenizers import Tokenizer, normalizers

    from data_prep.tokenizer import DEFAULT_SPECIAL_TOKENS, HFEncoder, make_encoder, train_bpe

    files = [p for p in sorted((stdlib_root() / "email").rglob("*.py"))]
    train_texts = [p.read_text(encoding="utf-8") for p in files]
    tok = train_bpe(train_texts, 2048, DEFAULT_SPECIAL_TOKENS)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    enc = make_encoder(path, "tiktoken")
    assert enc.name == "tiktoken"
    hf = HFEncoder(Tokenizer.from_file(str(path)))
    # unseen text: other stdlib modules (~1.5 MB), plus non-ASCII prose
    test_files = [
        p
        for name in ("asyncio", "unittest", "logging", "xml")
        for p in sorted((stdlib_root() / name).rglob("*.py"))
    ]
    texts = [p.read_text(encoding="utf-8") for p in test_files] + NON_ASCII
    n_tokens = 0
    for text in texts:
        ids = enc.encode(text)
        assert ids == hf.encode(text)
        n_tokens += len(ids)
    assert n_tokens > 300_000
    # a tokenizer with a normalizer has no tiktoken form: fall back, with a warning
    tok.normalizer = normalizers.NFKC()
    norm_path = tmp_path / "normalized.json"
    tok.save(str(norm_path))
    with caplog.at_level("WARNING"):
        fallback = make_encoder(norm_path, "auto")
    assert fallback.name == "tokenizers"
    assert "cannot be expressed in tiktoken form" in caplog.text
    with pytest.raises(RdptDataError, match="tiktoken"):
        make_encoder(norm_path, "tiktoken")


def test_round_trip_reproduces_every_document(tmp_path):
    docs = make_corpus(tmp_path / "corpus")
    out = tmp_path / "ds"
    manifest = prepare(
        PrepConfig(
            inputs=[str(tmp_path / "corpus")],
            output=str(out),
            tokenizer={"vocab_size": 700},
            seq_len=48,
            val_fraction=0.3,
            shard_size_mb=0.02,
            workers=1,
        )
    )
    train, val = decode_split(out, "train"), decode_split(out, "val")
    expected_val = [d for d in docs if is_val(d, 0.3, 0)]
    expected_train = [d for d in docs if not is_val(d, 0.3, 0)]
    assert val == expected_val and train == expected_train
    assert len(val) > 0 and len(train) > 0
    # manifest: counts and checksums match the files
    from pipeline.common.atomic import sha256_file

    for split, n in (("train", len(train)), ("val", len(val))):
        info = manifest["splits"][split]
        assert info["documents"] == n
        assert len(info["shards"]) >= (2 if split == "train" else 1)
        assert info["sequences"] == sum(s["sequences"] for s in info["shards"])
        for shard in info["shards"]:
            assert sha256_file(out / shard["path"]) == shard["sha256"]
    assert manifest["tokenizer"]["sha256"] == sha256_file(out / "tokenizer.json")
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["encoder"] == "tiktoken"
    assert sum(s["documents"] for s in manifest["sources"]) == len(docs)
    assert (out / "config.yaml").is_file() and not (out / ".work").exists()


def test_same_bytes_for_1_and_2_workers_and_for_slurm_style_tasks(tmp_path):
    base = dict(
        inputs=stdlib_subset()[:2],
        limit_bytes=300_000,
        tokenizer={"vocab_size": 600},
        seq_len=32,
        val_fraction=0.1,
        shard_size_mb=0.05,
        chunk_mb=0.03,
    )
    prepare(PrepConfig(**base, output=str(tmp_path / "w1"), workers=1))
    prepare(PrepConfig(**base, output=str(tmp_path / "w2"), workers=2))
    ref = dataset_files(tmp_path / "w1")
    assert len([n for n in ref if n.endswith(".tar")]) >= 4
    assert dataset_files(tmp_path / "w2") == ref
    # job array: 3 encode tasks (any order), then finalize
    cfg = PrepConfig(**base, output=str(tmp_path / "tasks"), workers=1)
    prepare(cfg, task=(2, 3))
    with pytest.raises(RdptDataError, match=r"chunks are not encoded yet \(chunk 0, 1, 3"):
        prepare(cfg, finalize=True)
    prepare(cfg, task=(0, 3))
    prepare(cfg, task=(1, 3))
    prepare(cfg, finalize=True)
    assert dataset_files(tmp_path / "tasks") == ref


def test_kill_9_then_resume_gives_identical_bytes(tmp_path):
    inputs = [str(stdlib_root() / n) for n in ("asyncio", "email", "json", "unittest")]
    args = ["--input", *inputs, "--vocab-size", "600", "--seq-len", "128", "--workers", "1"]
    extra = ["limit_bytes=1000000", "chunk_mb=0.05", "shard_size_mb=0.2"]
    ref = tmp_path / "ref"
    assert rdpt(["prep", *extra, *args, "--output", str(ref)]) == 0
    out = tmp_path / "killed"
    # killed (the whole process group, SIGKILL) right after its 5th chunk: a crash at a known
    # point, however fast or loaded the machine
    env = dict(os.environ, OMP_NUM_THREADS="1", RDPT_PREP_KILL_AFTER_CHUNKS="5")
    cmd = [sys.executable, "-m", "pipeline", "prep", *extra, *args, "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, start_new_session=True, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (out / "manifest.json").exists()
    for p in out.rglob("*"):  # nothing half-written under a final name
        if p.is_file() and not p.name.startswith(".tmp-") and p.suffix == ".npz":
            np.load(p, allow_pickle=False)["train"]
    n_chunks = len(list((out / ".work").glob("chunk-*.npz")))
    assert rdpt(["prep", *extra, *args, "--output", str(out)]) == 0
    assert dataset_files(out) == dataset_files(ref)
    assert not list(out.rglob(".tmp-*"))
    assert n_chunks >= 5


def test_rerun_is_a_noop_and_a_different_dataset_needs_overwrite(tiny_dataset, tmp_path, capfd):
    from fixtures_data import build_tiny_dataset

    out = tmp_path / "tiny"
    shutil.copytree(tiny_dataset, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    build_tiny_dataset(out)
    assert "nothing to do" in capfd.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(RdptDataError, match="different dataset.*--overwrite"):
        build_tiny_dataset(out, seq_len=32)
    build_tiny_dataset(out, seq_len=32, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["seq_len"] == 32
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    with pytest.raises(RdptDataError, match="did not write.*thesis.tex"):
        build_tiny_dataset(foreign, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "mine"


def test_bad_inputs_give_clear_errors_or_counted_skips(tmp_path):
    def run(inputs, **kw):
        return prepare(
            PrepConfig(
                inputs=[str(i) for i in inputs],
                output=str(tmp_path / "o"),
                tokenizer={"vocab_size": 300},
                seq_len=16,
                workers=1,
                overwrite=True,
                **kw,
            )
        )

    with pytest.raises(RdptDataError, match="input path not found: .*nowhere"):
        run([tmp_path / "nowhere"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(RdptDataError, match="input is empty"):
        run([tmp_path / "empty.txt"])
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "good.txt").write_text("def f(x):\n    return x + 1\n" * 50)
    (d / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (d / "latin1.txt").write_bytes("café crème brûlée\n".encode("latin-1") * 20)
    (d / "rows.jsonl").write_text('{"text": "ok line"}\nnot json\n{"other": 1}\n')
    manifest = run([d])
    assert manifest["skipped"]["counts"] == {
        "binary": 1,
        "not UTF-8": 1,
        "bad JSON line": 1,
        "no text field 'text'": 1,
    }
    assert manifest["splits"]["train"]["documents"] == 2
    with pytest.raises(RdptDataError, match=r"binary.txt: binary \(--strict\)"):
        run([d], strict=True)
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "x.txt").write_bytes(b"\xff\xfe\x00\x01" * 100)
    with pytest.raises(RdptDataError, match="no document survived.*binary"):
        run([only_bad])
    with pytest.raises(RdptDataError, match="matches no files"):
        run([str(tmp_path / "*.nothing")])


def test_verify_names_a_flipped_or_truncated_shard(tiny_dataset, tmp_path):
    from pipeline.data.loader import ResumableLoader

    d = tmp_path / "copy"
    shutil.copytree(tiny_dataset, d)
    report = verify_dataset(d)
    assert report["train"]["sequences"] > 300
    m = json.loads((d / "manifest.json").read_text())
    flipped = d / m["splits"]["train"]["shards"][1]["path"]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated = d / m["splits"]["val"]["shards"][0]["path"]
    truncated.write_bytes(truncated.read_bytes()[:3000])
    with pytest.raises(RdptDataError) as e:
        verify_dataset(d)
    assert str(flipped) in str(e.value) and str(truncated) in str(e.value)
    # the reader names the damaged shard too (sha256 at first open, or the tar structure)
    for verify_shards in (True, False):
        loader = ResumableLoader(
            d,
            split="val",
            micro_batch_size=8,
            verify_shards=verify_shards,
            prefetch=0,
            shuffle=False,
        )
        with pytest.raises(RdptDataError, match=str(truncated)):
            next(iter(loader))
    assert rdpt(["prep", "verify", str(d)]) == 2


def test_cli_verify_inspect_help_and_flags(tiny_dataset, capsys):
    with pytest.raises(SystemExit) as e:
        rdpt(["prep", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "rdpt prep verify" in out and "--task-index" in out
    assert rdpt(["prep", "verify", str(tiny_dataset), "--decode", "1"]) == 0
    out = capsys.readouterr().out
    assert "--- train sequence 0" in out
    assert rdpt(["prep", "inspect", str(tiny_dataset)]) == 0
    out = capsys.readouterr().out
    assert "top 20 tokens" in out and "document length" in out and "bytes/token" in out
    assert rdpt(["prep", "--task-index", "env", "--input", "x", "--output", "y"]) == 2
    assert "SLURM_ARRAY_TASK_ID" in capsys.readouterr().err


def test_task_index_env_reads_the_slurm_array(monkeypatch):
    import argparse

    from pipeline.cli.prep import task_from_args

    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert task_from_args(argparse.Namespace(task_index="env", num_tasks=None)) == (1, 3)
    assert task_from_args(argparse.Namespace(task_index="2", num_tasks=3)) == (2, 3)
    assert task_from_args(argparse.Namespace(task_index=None, num_tasks=None)) is None


def test_embedded_corpus_is_the_stdlib_without_site_packages():
    files = expand_inputs(["@stdlib"], [".py"])
    paths = [f.path for f in files]
    assert len(paths) > 500 and all(p.endswith(".py") for p in paths)
    assert not any("site-packages" in p for p in paths)
    assert paths == [f.path for f in expand_inputs(["@stdlib"], [".py"])]
    assert sum(f.size for f in files) > 10_000_000


def test_pack_resumes_after_the_last_complete_shard(tmp_path, monkeypatch):
    """A crash while packing (here: an exception raised after two shards) leaves only complete
    shards under final names; the re-run keeps them untouched and writes the rest."""
    import data_prep.pack as pack

    base = dict(
        inputs=stdlib_subset()[:2],
        limit_bytes=200_000,
        tokenizer={"vocab_size": 400},
        seq_len=32,
        val_fraction=0.1,
        shard_size_mb=0.02,
        workers=1,
    )
    prepare(PrepConfig(**base, output=str(tmp_path / "ref")))
    out = tmp_path / "crashed"
    real_write, written = pack.write_shard, []

    def crash_after_two(path, *args):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated crash while packing")
        written.append(path)
        return real_write(path, *args)

    monkeypatch.setattr(pack, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepConfig(**base, output=str(out)))
    monkeypatch.setattr(pack, "write_shard", real_write)
    assert not (out / "manifest.json").exists() and len(written) == 2
    assert sorted(out.rglob("shard-*.tar")) == sorted(written)
    stamps = {p: p.stat().st_mtime_ns for p in written}
    prepare(PrepConfig(**base, output=str(out)))
    assert {p: p.stat().st_mtime_ns for p in written} == stamps
    assert dataset_files(out) == dataset_files(tmp_path / "ref")
    assert len(dataset_files(out)) > 4


def test_big_json_lines_file_is_cut_into_line_aligned_chunks(tmp_path):
    """A JSON Lines file larger than a chunk is encoded in byte ranges; each line belongs to
    the range it starts in, so every document appears exactly once, in order."""
    rng = np.random.default_rng(0)
    words = (stdlib_root() / "json" / "decoder.py").read_text().split()
    docs = [
        " ".join(rng.choice(words, size=int(rng.integers(1, 120)))) + f" ü{i}" for i in range(400)
    ]
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    out = tmp_path / "ds"
    prepare(
        PrepConfig(
            inputs=[str(path)],
            output=str(out),
            tokenizer={"vocab_size": 400},
            seq_len=64,
            val_fraction=0.0,
            chunk_mb=0.004,
            workers=2,
        )
    )
    assert path.stat().st_size > 20 * 0.004 * 2**20  # cut into > 20 ranges
    assert decode_split(out, "train") == docs


def test_disk_full_while_preparing_is_a_clear_error_with_no_partial_file(tmp_path, capsys):
    from fixtures_data import small_filesystem, stdlib_subset

    out = tmp_path / "fs" / "data"
    with small_filesystem(tmp_path / "fs", "300k"):
        rc = rdpt(
            [
                "prep",
                "--input",
                *stdlib_subset(),
                "--output",
                str(out),
                "--vocab-size",
                "512",
                "--seq-len",
                "64",
                "--workers",
                "1",
                "limit_bytes=400000",
            ]
        )
        err = capsys.readouterr().err
        assert rc == 2, err
        assert "no space left on device writing" in err and str(out) in err, err
        assert not (out / "manifest.json").exists()
        assert not list(out.rglob(".tmp-*"))  # the half-written file was removed
        for shard in out.rglob("shard-*.tar"):  # whatever has a final name is whole
            with tarfile.open(shard) as tar:
                assert all(m.size > 0 for m in tar.getmembers())
