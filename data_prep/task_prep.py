"""`rdpt prep --task NAME`: a reasoning-task dataset as WebDataset shards + manifest.

    from data_prep.task_prep import TaskPrepConfig, prepare_task
    prepare_task(TaskPrepConfig(task="arithmetic", output="data/arith", seed=0,
                                sizes={"train": 20000, "val": 500, "test": 1000},
                                arithmetic={"steps": [1, 6]}))

The examples come from one random stream seeded by `seed`; each goes to train, val or test by
a keyed hash of its question (the same question always lands in the same split, whatever the
sizes), and a question already taken is skipped, so the splits hold disjoint instances. The
same config writes the same bytes.

The layout extends the pretraining format (README "On-disk format"): every example is one row
of seq_len + 1 tokens, `question ; step 1 ; ... ; step k ; => answer <|endoftext|>`, padded
with `<|pad|>`, so every reader of `rdpt prep` datasets can read it. Per member the shard holds,
under the same key:

  {m}.npy             uint16 [n, seq_len+1]  tokens
  {m}.mask.npy        uint8  [n, seq_len+1]  1 where the token is trained on as a target
                                             (reasoning steps and answer), 0 question/padding
  {m}.steps.npy       int16  [n, seq_len+1]  segment of each token: 0 question, k the k-th
                                             reasoning step (its words and its `;`),
                                             ANSWER (-1) `=> answer <|endoftext|>`, PAD (-2)
  {m}.difficulty.npy  int16  [n]             number of reasoning steps

The tokenizer is word-level over the task's fixed vocabulary (ids 0-15 are rdpt's special
tokens: `<|endoftext|>`, `<|pad|>`, `<|pause|>`, `<|thought|>`, `<|begin_thought|>`,
`<|end_thought|>`, ...). The manifest adds `kind: task`, `task {name, settings, seed}`,
`fields`, `special_ids` and per split `difficulty` counts.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from data_prep.reasoning_tasks import (
    ANSWER_MARK,
    QUESTION_END,
    STEP_END,
    ArithmeticSettings,
    Example,
    ReachabilitySettings,
    make_task,
)
from data_prep.shards import member_key, npy_bytes, write_tar_members
from data_prep.tokenizer import DEFAULT_SPECIAL_TOKENS, EOT, PAD
from pipeline.common.atomic import atomic_directory, atomic_open, atomic_write_json, sha256_file
from pipeline.common.config_io import ConfigModel
from pipeline.common.errors import RdptConfigError, RdptDataError

TASK_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
QUESTION, ANSWER, PAD_SEGMENT = 0, -1, -2
FIELDS = {
    "npy": "tokens uint16 [n, seq_len+1]",
    "mask.npy": "uint8 [n, seq_len+1]: 1 = trained on as a target (steps, answer)",
    "steps.npy": "int16 [n, seq_len+1]: 0 question, k step k, -1 answer, -2 padding",
    "difficulty.npy": "int16 [n]: number of reasoning steps",
}


class TaskPrepConfig(ConfigModel):
    task: str
    """arithmetic | reachability (data_prep/reasoning_tasks.py)."""
    output: str
    seed: int = 0
    """The whole dataset is a function of the seed and the settings."""
    sizes: dict[str, int] = {"train": 10000, "val": 500, "test": 1000}
    """Examples per split (train, val, test; each >= 1)."""
    arithmetic: ArithmeticSettings = ArithmeticSettings()
    reachability: ReachabilitySettings = ReachabilitySettings()
    seq_len: int | None = Field(None, ge=8)
    """Tokens per row (inputs); default: the longest example + `reserve`."""
    reserve: int = Field(16, ge=0)
    """Padding kept free in the longest row (room for pause tokens inserted at load time)."""
    seqs_per_member: int = Field(64, ge=1)
    rows_per_shard: int = Field(4096, ge=1)
    overwrite: bool = False

    @model_validator(mode="after")
    def _checks(self) -> TaskPrepConfig:
        if set(self.sizes) != set(SPLITS) or min(self.sizes.values()) < 1:
            raise RdptConfigError(
                f"sizes: give train, val and test, each >= 1; got {dict(self.sizes)}"
            )
        if self.rows_per_shard % self.seqs_per_member:
            raise RdptConfigError(
                f"rows_per_shard={self.rows_per_shard} is not a multiple of "
                f"seqs_per_member={self.seqs_per_member}"
            )
        return self

    def settings(self) -> dict:
        section = getattr(self, self.task, None)
        return section.model_dump(mode="json") if section is not None else {}


def word_vocabulary(task) -> list[str]:
    """rdpt's special tokens (fixed ids), then the task's words."""
    return [*DEFAULT_SPECIAL_TOKENS, STEP_END, QUESTION_END, ANSWER_MARK, *task.vocabulary()]


def write_word_tokenizer(path: Path, words: list[str]) -> None:
    """A Hugging Face word-level tokenizer.json (whitespace split, decode joins with spaces)."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=PAD))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in DEFAULT_SPECIAL_TOKENS])
    with atomic_open(path, "w") as f:
        f.write(tok.to_str(pretty=True))


def split_of(key: str, seed: int, sizes: dict[str, int]) -> str:
    """train / val / test by a keyed hash of the instance (proportional to the sizes)."""
    h = hashlib.blake2b(key.encode(), key=seed.to_bytes(8, "little", signed=True), digest_size=8)
    u = int.from_bytes(h.digest(), "little") / 2**64
    total = sum(sizes.values())
    edge = 0.0
    for split in SPLITS:
        edge += sizes[split] / total
        if u < edge:
            return split
    return SPLITS[-1]


def generate_examples(task, seed: int, sizes: dict[str, int]) -> dict[str, list[Example]]:
    """Disjoint splits of distinct instances (see the module docstring)."""
    rng = random.Random(seed)
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    total = sum(sizes.values())
    budget = 50 * total + 1000
    for _ in range(budget):
        if all(len(out[s]) >= sizes[s] for s in SPLITS):
            return out
        ex = task.sample(rng)
        if ex.key in seen:
            continue
        seen.add(ex.key)
        split = split_of(ex.key, seed, sizes)
        if len(out[split]) < sizes[split]:
            out[split].append(ex)
    have = {s: len(v) for s, v in out.items()}
    raise RdptConfigError(
        f"task {task.name}: found only {have} distinct examples of {dict(sizes)} after "
        f"{budget} draws; the settings allow too few instances (widen the step range, "
        "the modulus or the node count, or ask for fewer examples)"
    )


def encode_example(ex: Example, ids: dict[str, int]) -> tuple[list[int], list[int]]:
    """(token ids, segment per token) of `question ; step ; ... => answer <eot>`."""
    tokens, segments = [], []

    def put(words: str, segment: int):
        for w in words.split():
            tokens.append(ids[w])
            segments.append(segment)

    put(ex.question, QUESTION)
    for k, step in enumerate(ex.steps, start=1):
        put(f"{step} {STEP_END}", k)
    put(f"{ANSWER_MARK} {ex.answer} {EOT}", ANSWER)
    return tokens, segments


def encode_split(examples: list[Example], ids: dict[str, int], seq_len: int) -> dict:
    n, width = len(examples), seq_len + 1
    tokens = np.full((n, width), ids[PAD], dtype=np.uint16)
    segments = np.full((n, width), PAD_SEGMENT, dtype=np.int16)
    for i, ex in enumerate(examples):
        t, s = encode_example(ex, ids)
        tokens[i, : len(t)] = t
        segments[i, : len(s)] = s
    mask = ((segments > 0) | (segments == ANSWER)).astype(np.uint8)
    difficulty = np.array([ex.difficulty for ex in examples], dtype=np.int16)
    return {"npy": tokens, "mask.npy": mask, "steps.npy": segments, "difficulty.npy": difficulty}


def write_task_shards(root: Path, split: str, arrays: dict, cfg: TaskPrepConfig) -> list[dict]:
    """Shards of `rows_per_shard` rows, members of `seqs_per_member` rows, all fields per key."""
    (root / split).mkdir(parents=True, exist_ok=True)
    n, spm, shards = len(arrays["npy"]), cfg.seqs_per_member, []
    for s, first in enumerate(range(0, n, cfg.rows_per_shard)):
        last = min(first + cfg.rows_per_shard, n)
        members = []
        for start in range(first, last, spm):
            key = member_key(start // spm)
            for field in FIELDS:
                members.append((f"{key}.{field}", npy_bytes(arrays[field][start : start + spm])))
        path = root / split / f"shard-{s:06d}.tar"
        with atomic_open(path, "wb") as f:
            write_tar_members(f, members)
        shards.append(
            {
                "path": f"{split}/{path.name}",
                "sha256": sha256_file(path),
                "sequences": last - first,
                "bytes": path.stat().st_size,
            }
        )
    return shards


def fingerprint(cfg: TaskPrepConfig) -> str:
    data = cfg.model_dump(mode="json", exclude={"output", "overwrite"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def prepare_task(cfg: TaskPrepConfig) -> dict:
    """Write the dataset (once: a finished dataset of the same config is left as it is)."""
    task = make_task(cfg.task, cfg.settings())
    out = Path(cfg.output)
    fp = fingerprint(cfg)
    if (out / "manifest.json").is_file():
        old = json.loads((out / "manifest.json").read_text())
        if old.get("fingerprint") == fp:
            return old
        if not cfg.overwrite:
            raise RdptDataError(
                f"{out} holds a different dataset (fingerprint differs): pass --overwrite "
                "to replace it, or choose another output"
            )
    elif out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise RdptDataError(f"{out} exists and is not a prepared dataset; choose another output")
    words = word_vocabulary(task)
    ids = {w: i for i, w in enumerate(words)}
    examples = generate_examples(task, cfg.seed, cfg.sizes)
    longest = max(len(encode_example(ex, ids)[0]) for exs in examples.values() for ex in exs)
    seq_len = cfg.seq_len if cfg.seq_len is not None else longest + cfg.reserve
    if longest > seq_len + 1:
        raise RdptConfigError(
            f"seq_len={seq_len}: the longest example has {longest} tokens (needs seq_len >= "
            f"{longest - 1}); raise seq_len or leave it unset"
        )
    if out.exists():
        shutil.rmtree(out)
    with atomic_directory(out) as tmp:
        write_word_tokenizer(tmp / "tokenizer.json", words)
        splits = {}
        for split in SPLITS:
            arrays = encode_split(examples[split], ids, seq_len)
            levels, counts = np.unique(arrays["difficulty.npy"], return_counts=True)
            splits[split] = {
                "tokens": int((arrays["steps.npy"] != PAD_SEGMENT).sum()),
                "padding_tokens": int((arrays["steps.npy"] == PAD_SEGMENT).sum()),
                "sequences": len(examples[split]),
                "documents": len(examples[split]),
                "difficulty": {str(int(d)): int(c) for d, c in zip(levels, counts)},
                "shards": write_task_shards(tmp, split, arrays, cfg),
            }
        special = {t: ids[t] for t in DEFAULT_SPECIAL_TOKENS}
        manifest = {
            "format_version": 1,
            "kind": "task",
            "task_format_version": TASK_FORMAT_VERSION,
            "fingerprint": fp,
            "task": {"name": cfg.task, "settings": cfg.settings(), "seed": cfg.seed},
            "seq_len": seq_len,
            "dtype": "uint16",
            "vocab_size": len(words),
            "eot_id": ids[EOT],
            "pad_id": ids[PAD],
            "special_ids": {**special, ANSWER_MARK: ids[ANSWER_MARK], STEP_END: ids[STEP_END]},
            "seqs_per_member": cfg.seqs_per_member,
            "rows_per_shard": cfg.rows_per_shard,
            "layout": "one example per row, padded with <|pad|>; fields per member key",
            "fields": FIELDS,
            "tokenizer": {
                "path": "tokenizer.json",
                "sha256": sha256_file(tmp / "tokenizer.json"),
                "encoder": "word-level",
                "special_tokens": list(DEFAULT_SPECIAL_TOKENS),
            },
            "config": cfg.model_dump(mode="json"),
            "splits": splits,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest
