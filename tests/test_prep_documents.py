"""Data like the published Huginn run's: a tokenizer with <|begin_text|>/<|end_text|> (and no
<|endoftext|>), rows that start at document starts (tails dropped and counted, or carried), and
pre-tokenized Parquet / .npy input that skips the tokenizer."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_prep.config import PrepConfig
from data_prep.prep import prepare
from data_prep.sources import stdlib_root
from data_prep.tokenizer import train_bpe
from pipeline.common.errors import RdptDataError

BEGIN, END = "<|begin_text|>", "<|end_text|>"


def huginn_style_tokenizer(path: Path) -> Path:
    """A small byte-level BPE with Huginn's document tokens and no <|endoftext|>."""
    texts = [p.read_text() for p in sorted((stdlib_root() / "json").glob("*.py"))]
    tok = train_bpe(texts, 400, [BEGIN, END, "<|pad|>"])
    tok.save(str(path))
    return path


def documents() -> list[str]:
    """Paragraphs of the json package's sources: lengths from a few tokens to many rows."""
    text = "\n".join(p.read_text() for p in sorted((stdlib_root() / "json").glob("*.py")))
    paras = [p for p in text.split("\n\n") if p.strip()]
    return paras[:60] + ["\n\n".join(paras[60:75])]  # and one document of many rows


def rows_of(d: Path, split: str = "train") -> np.ndarray:
    m = json.loads((d / "manifest.json").read_text())
    rows = []
    for shard in m["splits"][split]["shards"]:
        with tarfile.open(d / shard["path"]) as tf:
            for member in tf.getmembers():
                rows.append(np.load(io.BytesIO(tf.extractfile(member).read())))
    return np.concatenate(rows) if rows else np.zeros((0, m["seq_len"] + 1), np.int64)


def dataset_bytes(d: Path) -> dict[str, bytes]:
    names = ["manifest.json", "tokenizer.json"] + sorted(
        str(p.relative_to(d)) for p in d.glob("*/shard-*.tar")
    )
    return {n: (d / n).read_bytes() for n in names}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    tok = huginn_style_tokenizer(root / "tokenizer.json")
    docs = documents()
    (root / "in").mkdir()
    for k in range(3):  # three files: several encode chunks
        part = docs[k::3]
        lines = "".join(json.dumps({"text": t}) + "\n" for t in part)
        (root / "in" / f"part{k}.jsonl").write_text(lines)
    order = [t for k in range(3) for t in docs[k::3]]  # input order
    return root, tok, order


def prep(root: Path, tok: Path, out: Path, **kw) -> dict:
    cfg = dict(
        inputs=[str(root / "in")],
        output=str(out),
        tokenizer={"path": str(tok), "begin_token": BEGIN, "end_token": END},
        seq_len=32,
        val_fraction=0.0,
        shard_size_mb=0.001,
        seqs_per_member=4,
        chunk_mb=0.004,
        workers=1,
    )
    cfg.update(kw)
    return prepare(PrepConfig(**cfg))


def wrapped_ids(tok_path: Path, docs: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    b, e = tok.token_to_id(BEGIN), tok.token_to_id(END)
    return [[b, *tok.encode(t, add_special_tokens=False).ids, e] for t in docs]


def test_document_packing_starts_every_row_at_a_document_and_counts_the_dropped_tails(
    corpus, tmp_path
):
    root, tok, docs = corpus
    m = prep(root, tok, tmp_path / "w1", packing="document", tails="drop")
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(tok))
    b, e = t.token_to_id(BEGIN), t.token_to_id(END)
    assert t.token_to_id("<|endoftext|>") is None
    assert (m["bos_id"], m["eot_id"], m["packing"], m["tails"]) == (b, e, "document", "drop")
    rows = rows_of(tmp_path / "w1")
    assert rows.shape[0] > 10 and (rows[:, 0] == b).all(), "a row does not start a document"
    # the rows hold whole documents and one cut tail each: replay them against the input
    want = wrapped_ids(tok, docs)
    info = m["splits"]["train"]
    assert info["tokens"] == sum(len(w) for w in want) and info["documents"] == len(docs)
    kept, k = 0, 0
    for i, row in enumerate(rows.tolist()):
        last = i == len(rows) - 1
        body = row[: len(row) - info["padding_tokens"]] if last else row
        pos = 0
        while pos < len(body):
            doc = want[k]
            piece = body[pos : pos + len(doc)]
            assert piece == doc[: len(piece)], f"row {i} does not hold document {k}"
            pos += len(piece)
            kept += len(piece)
            k += 1
        if last:
            assert row[len(body) :] == [e] * info["padding_tokens"]
    assert k == len(docs), "documents are missing from the rows"
    assert info["dropped_tokens"] == info["tokens"] - kept > 0  # nothing lost but counted tails
    # byte-identical for any worker count
    prep(root, tok, tmp_path / "w2", packing="document", tails="drop", workers=2)
    assert dataset_bytes(tmp_path / "w2") == dataset_bytes(tmp_path / "w1")


def test_carried_tails_lose_nothing_and_stream_packing_stays_the_default(corpus, tmp_path):
    root, tok, docs = corpus
    m = prep(root, tok, tmp_path / "carry", packing="document", tails="carry")
    info = m["splits"]["train"]
    stream = rows_of(tmp_path / "carry").ravel()
    assert info["dropped_tokens"] == 0
    flat = [i for w in wrapped_ids(tok, docs) for i in w]
    assert stream[: info["tokens"]].tolist() == flat  # rows cut only at overhangs: all kept
    # default packing: one stream cut anywhere, begin/end tokens around every document
    m = prep(root, tok, tmp_path / "stream")
    assert m["packing"] == "stream" and "dropped_tokens" not in m["splits"]["train"]
    assert rows_of(tmp_path / "stream").ravel()[: len(flat)].tolist() == flat


def test_a_tokenizer_without_the_configured_end_token_is_refused_by_name(corpus, tmp_path):
    root, tok, _ = corpus
    with pytest.raises(RdptDataError, match=r"tokenizer.end_token: '<\|endoftext\|>' is not a"):
        prep(root, tok, tmp_path / "x", tokenizer={"path": str(tok)})


def test_parquet_and_npy_token_ids_go_straight_to_packing(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, tok, _ = corpus
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 400, size=n).tolist() for n in (33, 33, 5, 70, 33)]
    src = tmp_path / "src"
    src.mkdir()
    table = pa.table({"input_ids": pa.array(docs[:3], type=pa.list_(pa.int32())), "x": [1, 2, 3]})
    pq.write_table(table, src / "a.parquet", row_group_size=2)
    np.save(src / "b.npy", np.asarray(docs[3], dtype=np.int64))  # 1-D: one document
    np.save(src / "c.npy", np.asarray([docs[4]], dtype=np.uint16))  # 2-D: one per row
    m = prepare(
        PrepConfig(
            inputs=[str(src)],
            output=str(tmp_path / "ds"),
            tokenizer={"path": str(tok), "begin_token": BEGIN, "end_token": END},
            seq_len=32,
            val_fraction=0.0,
            workers=1,
        )
    )
    flat = [i for d in docs for i in d]  # published rows hold their own begin/end tokens
    info = m["splits"]["train"]
    assert info["tokens"] == len(flat) and info["documents"] == len(docs)
    assert rows_of(tmp_path / "ds").ravel()[: len(flat)].tolist() == flat
    assert (tmp_path / "ds" / "tokenizer.json").read_bytes() == tok.read_bytes()
    # wrap_pretokenized: begin/end tokens around each row, like text documents
    m = prepare(
        PrepConfig(
            inputs=[str(src / "a.parquet")],
            output=str(tmp_path / "wrapped"),
            tokenizer={"path": str(tok), "begin_token": BEGIN, "end_token": END},
            seq_len=32,
            val_fraction=0.0,
            wrap_pretokenized=True,
            packing="document",
            workers=1,
        )
    )
    rows = rows_of(tmp_path / "wrapped")
    assert (rows[:, 0] == m["bos_id"]).all() and m["splits"]["train"]["dropped_tokens"] > 0


def test_bad_pretokenized_input_is_named_by_file_and_row(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, tok, _ = corpus

    def run(name, make, **kw):
        src = tmp_path / name
        src.mkdir()
        path = make(src)
        cfg = dict(
            inputs=[str(path)],
            output=str(tmp_path / f"out-{name}"),
            tokenizer={"path": str(tok), "end_token": END},
            seq_len=16,
            workers=1,
        )
        cfg.update(kw)
        return prepare(PrepConfig(**cfg))

    def parquet(table):
        def make(src):
            pq.write_table(table, src / "t.parquet")
            return src / "t.parquet"

        return make

    strings = pa.table({"input_ids": pa.array([["a", "b"]])})
    with pytest.raises(
        RdptDataError, match=r"t\.parquet: column 'input_ids' is list<.*string>, not a list"
    ):
        run("strings", parquet(strings))
    with pytest.raises(RdptDataError, match=r"t\.parquet: no column 'input_ids' \(columns: ids\)"):
        run("column", parquet(pa.table({"ids": pa.array([[1, 2]])})))
    big = pa.table({"input_ids": pa.array([[1, 2], [3, 4], [5, 4000]])})
    with pytest.raises(RdptDataError, match=r"t\.parquet row 2: token id 4000 is outside"):
        run("big", parquet(big))

    def npy(src):
        np.save(src / "t.npy", np.asarray([[1.5, 2.0]]))
        return src / "t.npy"

    with pytest.raises(RdptDataError, match=r"t\.npy: a \.npy token file must be .* integer"):
        run("float", npy)
    with pytest.raises(RdptDataError, match=r"t\.parquet needs tokenizer\.path"):
        run("notok", parquet(pa.table({"input_ids": pa.array([[1, 2]])})), tokenizer={})
