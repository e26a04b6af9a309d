"""Reading reasoning-task datasets (`rdpt prep --task`) for fine-tuning and evaluation.

    from pipeline.data.task_loader import TaskLoader, task_examples, insert_pauses
    loader = TaskLoader("data/arith", split="train", micro_batch_size=8, grad_accum=1,
                        dp_rank=0, dp_size=1, seed=0, pause_count=4,
                        pause_placement="before_answer")
    for step_batches in loader:        # the order and resume of pipeline/data/loader.py
        for tb in step_batches:        # TaskBatch(inputs, targets, sample_ids, tokens,
            ...                        #           segments, mask, difficulty)

A TaskBatch is a MicroBatch (inputs, targets, sample_ids come first, with the same meaning)
whose targets are -1 wherever the target token is not trained on: the question, the padding
and every pause token. `tokens`, `segments` and `mask` are the whole rows [B, width] after the
transformations below (continuous-thought stages rebuild sequences from them).

Transformations, per example, in this order (pure functions of the row, the settings and the
sample id, so a resumed loader gives the same rows):
1. `steps="drop"` removes the language reasoning steps (question => answer directly);
2. `pause_count` > 0 inserts that many `<|pause|>` tokens (segment PAUSE, mask 0):
   `before_answer` right before `=>`; `random` at positions drawn from (pause_seed, sample id)
   anywhere after the first question token and before `=>`;
3. the row is padded back to seq_len + 1 (an example that no longer fits is an error naming it
   and the prep setting that makes room: `reserve` or `seq_len`); a training micro-batch is
   then cut to its longest row (`batch_width`): trailing padding changes no trained position
   under causal attention, but costs compute (without their steps, micro-batches of 1-4 step
   arithmetic are 32 of 80 positions wide).
Nothing else changes: the loss mask of every other token is the stored one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from pipeline.common.errors import RdptConfigError, RdptDataError
from pipeline.data.loader import ResumableLoader, SplitReader, open_dataset

QUESTION, ANSWER, PAD_SEGMENT, PAUSE = 0, -1, -2, -3
"""Segment codes: 0 question, k >= 1 the k-th reasoning step, then these (task_prep.py)."""
PLACEMENTS = ("before_answer", "random")
FIELDS = ("mask.npy", "steps.npy", "difficulty.npy")


class TaskBatch(NamedTuple):
    inputs: torch.Tensor  # LongTensor [B, seq_len]
    targets: torch.Tensor  # LongTensor [B, seq_len], -1 = no loss
    sample_ids: torch.Tensor  # LongTensor [B]
    tokens: torch.Tensor  # LongTensor [B, width] (width <= seq_len + 1: batch_width)
    segments: torch.Tensor  # LongTensor [B, width]
    mask: torch.Tensor  # BoolTensor [B, width]
    difficulty: torch.Tensor  # LongTensor [B]
    epoch: int = 0  # the data epoch the batch belongs to (curricula: coconut stages)


class TaskExample(NamedTuple):
    """One example without padding: 1-D arrays of equal length."""

    tokens: np.ndarray
    segments: np.ndarray
    mask: np.ndarray
    difficulty: int
    sample_id: int


def check_task_dataset(info, what: str) -> dict:
    """The manifest of a task dataset, or a clear error for `what` (the setting that needs one)."""
    if info.manifest.get("kind") != "task":
        raise RdptConfigError(
            f"{what}: {info.path} is not a task dataset (prepare one with rdpt prep --task)"
        )
    return info.manifest


def check_pause(count: int, placement: str) -> None:
    if count < 0:
        raise RdptConfigError(f"data.pause.count: must be >= 0, got {count}")
    if placement not in PLACEMENTS:
        raise RdptConfigError(f"data.pause.placement: one of {PLACEMENTS}, got {placement!r}")


def trim(tokens_row, segments_row, mask_row, difficulty, sample_id) -> TaskExample:
    keep = np.asarray(segments_row) != PAD_SEGMENT
    return TaskExample(
        np.asarray(tokens_row)[keep].astype(np.int64),
        np.asarray(segments_row)[keep].astype(np.int64),
        np.asarray(mask_row)[keep].astype(bool),
        int(difficulty),
        int(sample_id),
    )


def drop_steps(ex: TaskExample) -> TaskExample:
    keep = ex.segments <= 0
    return ex._replace(tokens=ex.tokens[keep], segments=ex.segments[keep], mask=ex.mask[keep])


def answer_start(ex: TaskExample) -> int:
    where = np.flatnonzero(ex.segments == ANSWER)
    if not len(where):
        raise RdptDataError(f"example {ex.sample_id} has no answer segment")
    return int(where[0])


def insert_pauses(
    ex: TaskExample, count: int, placement: str, pause_id: int, seed: int = 0
) -> TaskExample:
    """`count` pause tokens inserted (see the module docstring); their mask is 0, every other
    token keeps its own."""
    check_pause(count, placement)
    if count == 0:
        return ex
    end = answer_start(ex)
    if placement == "before_answer":
        at = np.full(count, end)
    else:
        rng = np.random.default_rng([seed, ex.sample_id])
        at = np.sort(rng.integers(1, end + 1, size=count))  # before index `at` of the original
    return ex._replace(
        tokens=np.insert(ex.tokens, at, pause_id),
        segments=np.insert(ex.segments, at, PAUSE),
        mask=np.insert(ex.mask, at, False),
    )


def pad_row(ex: TaskExample, width: int, pad_id: int) -> tuple[np.ndarray, ...]:
    n = len(ex.tokens)
    if n > width:
        raise RdptDataError(
            f"example {ex.sample_id}: {n} tokens after inserting pause tokens do not fit in a "
            f"row of {width} (seq_len + 1); prepare the task with a larger `reserve` or "
            "`seq_len`, or insert fewer pause tokens"
        )
    tokens = np.full(width, pad_id, dtype=np.int64)
    segments = np.full(width, PAD_SEGMENT, dtype=np.int64)
    mask = np.zeros(width, dtype=bool)
    tokens[:n], segments[:n], mask[:n] = ex.tokens, ex.segments, ex.mask
    return tokens, segments, mask


WIDTH_MULTIPLE = 16
"""Trimmed micro-batches have inputs of a multiple of this many positions (few shapes: a
compiled model sees at most seq_len / 16 of them)."""


def batch_width(examples: list[TaskExample], full_width: int) -> int:
    """The row width of a micro-batch: its longest example's, the inputs (width - 1) rounded up
    to a multiple of WIDTH_MULTIPLE, at most `full_width` (seq_len + 1)."""
    longest = max(len(ex.tokens) for ex in examples)
    if longest >= full_width:
        return full_width  # pad_row names an example that does not fit
    return min(full_width, -(-(longest - 1) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE + 1)


def collate(examples: list[TaskExample], width: int, pad_id: int) -> TaskBatch:
    rows = [pad_row(ex, width, pad_id) for ex in examples]
    tokens = torch.from_numpy(np.stack([r[0] for r in rows]))
    segments = torch.from_numpy(np.stack([r[1] for r in rows]))
    mask = torch.from_numpy(np.stack([r[2] for r in rows]))
    targets = torch.where(mask[:, 1:], tokens[:, 1:], torch.full_like(tokens[:, 1:], -1))
    return TaskBatch(
        inputs=tokens[:, :-1].contiguous(),
        targets=targets.contiguous(),
        sample_ids=torch.tensor([ex.sample_id for ex in examples], dtype=torch.long),
        tokens=tokens,
        segments=segments,
        mask=mask,
        difficulty=torch.tensor([ex.difficulty for ex in examples], dtype=torch.long),
    )


class TaskReader:
    """Rows and fields of one split of a task dataset by global example id."""

    def __init__(self, info, split: str, verify_shards: bool = True):
        self.info = info
        self.reader = SplitReader(info, split, verify_shards=verify_shards)
        self._fields: dict[int, dict] = {}

    def examples(self, ids) -> list[TaskExample]:
        r = self.reader
        members = np.searchsorted(r.member_first, ids, side="right") - 1
        out = []
        for sid, m in zip(ids, members):
            m = int(m)
            if m not in self._fields:
                if len(self._fields) > 64:
                    self._fields.clear()
                shard = r._reader(int(r.member_shard[m]))
                self._fields[m] = shard.member_fields(int(r.member_local[m]), FIELDS)
            f, i = self._fields[m], int(sid - r.member_first[m])
            rows = r.member(m)
            out.append(
                trim(rows[i], f["steps.npy"][i], f["mask.npy"][i], f["difficulty.npy"][i], sid)
            )
        return out

    def close(self) -> None:
        self.reader.close()


class TaskTransform(NamedTuple):
    """What the loader does to each example (module docstring, steps 1-2)."""

    steps: str = "keep"
    pause_count: int = 0
    pause_placement: str = "before_answer"
    pause_seed: int = 0
    pause_id: int = 2

    def __call__(self, ex: TaskExample) -> TaskExample:
        if self.steps == "drop":
            ex = drop_steps(ex)
        elif self.steps != "keep":
            raise RdptConfigError(f"data.reasoning_steps: keep or drop, got {self.steps!r}")
        return insert_pauses(
            ex, self.pause_count, self.pause_placement, self.pause_id, self.pause_seed
        )


def transform_for(info, steps="keep", pause_count=0, placement="before_answer", seed=0):
    manifest = check_task_dataset(info, "data.path")
    check_pause(pause_count, placement)
    pause_id = int(manifest["special_ids"]["<|pause|>"])
    return TaskTransform(steps, pause_count, placement, seed, pause_id)


class TaskLoader(ResumableLoader):
    """ResumableLoader over a task dataset yielding TaskBatch (same order, same resume)."""

    def __init__(
        self,
        path,
        split="train",
        *,
        steps: str = "keep",
        pause_count: int = 0,
        pause_placement: str = "before_answer",
        pause_seed: int = 0,
        **kw,
    ):
        super().__init__(path, split, **kw)
        self.transform = transform_for(self.info, steps, pause_count, pause_placement, pause_seed)
        self.task_reader = TaskReader(self.info, split, verify_shards=False)
        self.task_reader.reader = self.reader  # one set of open shards (verified by the base)

    def _step(self, epoch: int, position: int):
        if position + self.global_batch > self.reader.num_sequences:
            epoch, position = epoch + 1, 0
        order = self._order_for(epoch)
        per_rank = self.mb * self.ga
        start = position + self.dp_rank * per_rank
        ids = order.ids(start, start + per_rank)
        examples = [self.transform(ex) for ex in self.task_reader.examples(ids)]
        full, pad = self.info.seq_len + 1, int(self.info.pad_id)
        batches = []
        for i in range(self.ga):
            micro = examples[i * self.mb : (i + 1) * self.mb]
            width = batch_width(micro, full)  # = full when an example does not fit: pad_row says so
            batches.append(collate(micro, width, pad)._replace(epoch=epoch))
        return batches, epoch, position + self.global_batch


def task_examples(
    path: str | Path, split: str = "test", max_examples: int | None = None
) -> Iterator[TaskExample]:
    """The examples of `split` in stored order (evaluation), untransformed."""
    info = open_dataset(path)
    check_task_dataset(info, "--task")
    reader = TaskReader(info, split)
    n = reader.reader.num_sequences
    n = n if max_examples is None else min(n, max_examples)
    try:
        for start in range(0, n, 64):
            yield from reader.examples(np.arange(start, min(start + 64, n), dtype=np.int64))
    finally:
        reader.close()
