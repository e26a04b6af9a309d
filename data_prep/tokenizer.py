"""Tokenizers for data preparation: train a byte-level BPE with Hugging Face `tokenizers`, load
an existing `tokenizer.json`, and encode fast with a `tiktoken.Encoding` built from the same
vocabulary.

Why two libraries: `tokenizers` trains offline and its `tokenizer.json` is what training and
evaluation load, but it encodes at ~0.5 M tokens/s per thread; `tiktoken` runs the same
byte-level BPE algorithm 4-6x faster. A GPT-2 style byte-level BPE (ByteLevel pre-tokenizer with
the GPT-2 regex, no normalizer, merges that create tokens in id order) is expressed exactly as
tiktoken "mergeable ranks" (token bytes -> id). `make_encoder` builds the tiktoken form when the
tokenizer has that shape *and* gives identical ids to `tokenizers` on a probe text; otherwise it
falls back to `tokenizers` with a logged warning.

Special-token strings inside document text are encoded as ordinary text by tiktoken, so a
document can never inject an `<|endoftext|>` id (the HF fallback cannot do that, see
`HFEncoder`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.common.errors import RdptDataError

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
PAD = "<|pad|>"
# Reserved ids for later use (pause/thought tokens for recurrent-depth experiments).
DEFAULT_SPECIAL_TOKENS = [
    EOT,
    PAD,
    "<|pause|>",
    "<|thought|>",
    "<|begin_thought|>",
    "<|end_thought|>",
    *[f"<|reserved_{i}|>" for i in range(10)],
]

# The GPT-2 pre-tokenizer regex, exactly as `tokenizers.pre_tokenizers.ByteLevel(use_regex=True)`
# applies it (tiktoken's r50k_base uses the same expression).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map used by ByteLevel."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def train_bpe(
    texts: Iterable[str], vocab_size: int, special_tokens: list[str], min_frequency: int = 2
):
    """Train a byte-level BPE on `texts` (an iterator of documents); returns a `Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_hf(path: str | Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise RdptDataError(f"{path}: not a valid tokenizer.json ({e})") from None


def special_ids(tok) -> dict[str, int]:
    """Added special tokens of an HF tokenizer: {content: id}."""
    return {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}


def tiktoken_incompatibility(tokenizer_json: dict) -> str | None:
    """Why this tokenizer.json cannot be expressed as a tiktoken Encoding (None if it can)."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        return f"model type is {model.get('type')!r}, not BPE"
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return f"BPE option {key}={model.get(key)!r}"
    if model.get("byte_fallback"):
        return "BPE byte_fallback is set"
    if tokenizer_json.get("normalizer") is not None:
        return "it has a normalizer"
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel":
        return f"pre-tokenizer is {pre.get('type')!r}, not ByteLevel"
    if pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return "ByteLevel pre-tokenizer with add_prefix_space or without the GPT-2 regex"
    return None


def tiktoken_from_hf(tokenizer_json: dict, name: str = "rdpt-bpe"):
    """Build a `tiktoken.Encoding` with the vocabulary, regex and special tokens of a byte-level
    BPE tokenizer.json. Raises ValueError when the vocabulary is not a byte-level BPE."""
    import tiktoken

    why = tiktoken_incompatibility(tokenizer_json)
    if why:
        raise ValueError(why)
    # NOTE: str.translate to code points < 256 then latin-1 gives the raw bytes of a token.
    to_byte = {ord(c): b for b, c in bytes_to_unicode().items()}
    alphabet = set(bytes_to_unicode().values())
    specials = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}
    ranks: dict[bytes, int] = {}
    for token, idx in tokenizer_json["model"]["vocab"].items():
        if token in specials:
            continue
        if not alphabet.issuperset(token):
            raise ValueError(f"vocabulary entry {token!r} is not byte-level")
        ranks[token.translate(to_byte).encode("latin-1")] = idx
    if len(ranks) < 256 or any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError("vocabulary lacks some of the 256 single bytes")
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; HF merges the
    # pair with the lowest merge index. They agree when merge i creates the token of id order i.
    last = -1
    for merge in tokenizer_json["model"].get("merges", []):
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        idx = tokenizer_json["model"]["vocab"].get(a + b)
        if idx is None or idx <= last:
            raise ValueError(f"merge {a!r}+{b!r} does not create tokens in id order")
        last = idx
    return tiktoken.Encoding(
        name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )


class Encoder(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def encode_array(self, text: str) -> np.ndarray: ...


class TiktokenEncoder:
    """Encodes with tiktoken; special-token strings in text are encoded as ordinary text."""

    name = "tiktoken"

    def __init__(self, enc):
        self.enc = enc

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        """uint32 ids straight from tiktoken's buffer (no Python list: ~10% faster)."""
        return self.enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())


class HFEncoder:
    """Fallback: encodes with Hugging Face `tokenizers` (slower). NOTE: tokenizers always
    matches added special tokens in the text, so a document containing e.g. `<|endoftext|>`
    gets that id; decoding still reproduces the text exactly."""

    name = "tokenizers"

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.uint32)


@lru_cache(maxsize=4)
def _tiktoken_cached(path: str, stamp: tuple[int, int]) -> TiktokenEncoder:
    """Building the tiktoken form of a 32k vocabulary costs ~0.3 s: once per process."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return TiktokenEncoder(tiktoken_from_hf(data))


def make_encoder(path: str | Path, kind: str = "auto", probe_text: str = "", hf=None) -> Encoder:
    """The fastest encoder that reproduces `path`'s tokenizer exactly.

    kind: "auto" (tiktoken when possible and identical on `probe_text`, else tokenizers),
    "tiktoken" (error when impossible) or "tokenizers". `hf`: the already loaded HF tokenizer
    of `path`, if the caller has it (loading a 32k vocabulary takes ~0.3 s).
    """

    def get_hf():
        return hf if hf is not None else load_hf(path)

    if kind == "tokenizers":
        return HFEncoder(get_hf())
    st = Path(path).stat()
    try:
        enc = _tiktoken_cached(str(Path(path).resolve()), (st.st_mtime_ns, st.st_size))
    except ValueError as e:
        if kind == "tiktoken":
            raise RdptDataError(
                f"{path}: cannot be expressed as a tiktoken encoding: {e}"
            ) from None
        log.warning(
            "tokenizer %s cannot be expressed in tiktoken form (%s): encoding with "
            "Hugging Face tokenizers instead (about 5x slower)",
            path,
            e,
        )
        return HFEncoder(get_hf())
    if probe_text:
        tok = get_hf()
        probe = probe_text
        for s in special_ids(tok):  # see HFEncoder: the two differ on literal special tokens
            probe = probe.replace(s, "")
        if enc.encode(probe) != HFEncoder(tok).encode(probe):
            if kind == "tiktoken":
                raise RdptDataError(f"{path}: tiktoken and tokenizers disagree on probe text")
            log.warning(
                "tiktoken form of %s disagrees with tokenizers on probe text: "
                "encoding with tokenizers instead",
                path,
            )
            return HFEncoder(tok)
    return enc
