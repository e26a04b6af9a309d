"""`PrepConfig`: the schema of `rdpt prep` (configs/data/*.yaml + dotted overrides).

Fields marked "operational" change how the work runs, not what is written: they are left out
of the dataset fingerprint, so e.g. a re-run with more workers resumes the same dataset.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from data_prep.sources import STDLIB  # noqa: F401  (re-exported: the "@stdlib" input)
from data_prep.tokenizer import DEFAULT_SPECIAL_TOKENS, EOT, PAD
from pipeline.common.config_io import ConfigModel

DEFAULT_EXTENSIONS = [
    ".txt",
    ".md",
    ".rst",
    ".py",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".hpp",
    ".rs",
    ".go",
    ".java",
    ".js",
    ".ts",
    ".sh",
    ".tex",
    ".html",
    ".xml",
    ".json",
    ".toml",
    ".yaml",
    ".yml",
    ".cfg",
    ".ini",
    ".jsonl",
    ".jsonl.gz",
    ".jsonl.zst",
    ".parquet",
    ".npy",
]


class TokenizerConfig(ConfigModel):
    """Either `path` (an existing tokenizer.json) or a byte-level BPE trained on the input."""

    path: str | None = None
    vocab_size: int = Field(32768, ge=300, le=2**32 - 1)
    min_frequency: int = Field(2, ge=1)
    special_tokens: list[str] = Field(default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS))
    train_max_bytes: int = Field(64 * 2**20, ge=1)  # BPE trained on the first N bytes of text
    encoder: Literal["auto", "tiktoken", "tokenizers"] = "auto"
    begin_token: str | None = None
    """Special token put before every document (Huginn's `<|begin_text|>`); None = nothing."""
    end_token: str = EOT
    """Special token put after every document (Huginn's `<|end_text|>`); also the padding of
    a split's last row. Both must be special tokens of the tokenizer."""

    @field_validator("special_tokens")
    @classmethod
    def _eot_first(cls, v: list[str]) -> list[str]:
        if not v or v[0] != EOT:
            raise ValueError(f"special_tokens must start with {EOT!r} (got {v[:1]})")
        if PAD not in v:
            raise ValueError(f"special_tokens must contain {PAD!r}")
        if len(set(v)) != len(v):
            raise ValueError("special_tokens has duplicates")
        return v


class PrepConfig(ConfigModel):
    """Configuration of one prepared dataset."""

    inputs: list[str] = Field(default_factory=list)  # files, directories, globs, "@stdlib"
    output: str | None = None
    text_field: str = "text"  # JSON Lines: the field holding a document's text
    extensions: list[str] = Field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    limit_bytes: int | None = Field(None, ge=1)  # take files in order until this many bytes
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    seq_len: int = Field(2048, ge=1)
    packing: Literal["stream", "document"] = "stream"
    """`stream`: all documents concatenated and cut anywhere (no token lost; for small data).
    `document` (the published Huginn data): every row starts at a document start; documents
    fill a row until it holds seq_len+1 tokens, and what overhangs the row is handled by
    `tails`."""
    tails: Literal["drop", "carry"] = "drop"
    """document packing: `drop` the overhang of the row's last document (counted in the
    manifest as dropped_tokens), or `carry` it into the next row(s), which then start with
    that continuation (nothing lost; the published run did this for sources marked so)."""
    token_column: str = "input_ids"
    """Parquet input: the list-of-integers column holding a document's token ids."""
    wrap_pretokenized: bool = False
    """Pre-tokenized input (Parquet, .npy): add begin/end tokens around each row like text
    documents get them. Off: the rows already hold them (the published data does)."""
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    split_seed: int = 0  # mixed into each document's content hash
    seqs_per_member: int = Field(16, ge=1)
    shard_size_mb: float = Field(256.0, gt=0)
    chunk_mb: float = Field(4.0, gt=0)  # encode work unit (resume + Slurm array granularity)
    # operational (workers, overwrite: not part of the fingerprint)
    workers: int | None = Field(None, ge=1)  # default: all cores
    overwrite: bool = False
    strict: bool = False  # error (instead of skip + count) on non-UTF-8 / binary input

    @model_validator(mode="after")
    def _check(self) -> PrepConfig:
        if self.tokenizer.path is None and self.tokenizer.vocab_size < 256 + len(
            self.tokenizer.special_tokens
        ):
            raise ValueError("tokenizer.vocab_size must exceed 256 + number of special tokens")
        return self

    def fingerprint_fields(self) -> dict:
        """The fields that determine the bytes written."""
        data = self.model_dump(mode="json")
        for key in ("workers", "overwrite", "output"):
            data.pop(key)
        return data
