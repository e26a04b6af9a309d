"""Pause tokens (data.pause): inserted exactly where asked, no loss on them and nothing else
masked; the task loader's order and resume are the pretraining loader's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep.task_prep import TaskPrepConfig, prepare_task
from pipeline.common.errors import RdptConfigError, RdptDataError
from pipeline.data.loader import ResumableLoader
from pipeline.data.task_loader import (
    ANSWER,
    PAUSE,
    TaskLoader,
    TaskTransform,
    collate,
    insert_pauses,
    task_examples,
)

PAUSE_ID = 2


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    out = tmp_path_factory.mktemp("task") / "arith"
    prepare_task(
        TaskPrepConfig(
            task="arithmetic",
            output=str(out),
            sizes={"train": 96, "val": 8, "test": 16},
            seqs_per_member=8,
            rows_per_shard=32,
            reserve=8,
        )
    )
    return out


def _without_pauses(ex):
    keep = ex.segments != PAUSE
    return ex.tokens[keep], ex.segments[keep], ex.mask[keep]


@pytest.mark.parametrize("placement", ["before_answer", "random"])
@pytest.mark.parametrize("count", [1, 3, 8])
def test_insertion_adds_exactly_count_pauses_and_changes_nothing_else(arith, placement, count):
    for ex in task_examples(arith, "train", max_examples=40):
        out = insert_pauses(ex, count, placement, PAUSE_ID, seed=7)
        is_pause = out.segments == PAUSE
        assert is_pause.sum() == count == (out.tokens == PAUSE_ID).sum()
        assert not out.mask[is_pause].any()  # no loss on predicting a pause
        tokens, segments, mask = _without_pauses(out)  # and every other token as it was
        assert np.array_equal(tokens, ex.tokens) and np.array_equal(mask, ex.mask)
        assert np.array_equal(segments, ex.segments)
        first_answer = int(np.flatnonzero(out.segments == ANSWER)[0])
        pauses = np.flatnonzero(is_pause)
        assert pauses.max() < first_answer and pauses.min() >= 1
        if placement == "before_answer":
            assert np.array_equal(pauses, np.arange(first_answer - count, first_answer))


def test_random_placement_is_a_function_of_seed_and_sample(arith):
    ex = next(iter(task_examples(arith, "train", max_examples=1)))
    a = insert_pauses(ex, 5, "random", PAUSE_ID, seed=1)
    b = insert_pauses(ex, 5, "random", PAUSE_ID, seed=1)
    assert np.array_equal(a.tokens, b.tokens)
    spots = {
        tuple(np.flatnonzero(insert_pauses(ex, 5, "random", PAUSE_ID, s).segments == PAUSE))
        for s in range(8)
    }
    assert len(spots) > 1


def test_targets_lose_exactly_the_pause_positions(arith):
    """The loss mask with pauses = the loss mask without, minus the pause positions."""
    examples = list(task_examples(arith, "train", max_examples=8))
    width = 1 + max(len(ex.tokens) for ex in examples) + 4
    plain = collate(examples, width, pad_id=1)
    paused = collate([insert_pauses(ex, 4, "random", PAUSE_ID, 3) for ex in examples], width, 1)
    for b in range(len(examples)):
        trained_plain = plain.targets[b][plain.targets[b] >= 0]
        keep = paused.segments[b, 1:] != PAUSE  # target positions that are not pauses
        assert (paused.targets[b][~keep] == -1).all()
        assert torch.equal(paused.targets[b][keep][paused.targets[b][keep] >= 0], trained_plain)
        # and the targets that are trained are exactly the stored mask (steps + answer)
        assert torch.equal(plain.targets[b] >= 0, plain.mask[b, 1:])


def test_drop_steps_keeps_question_and_answer_only(arith):
    t = TaskTransform(steps="drop", pause_count=2, pause_id=PAUSE_ID)
    for ex in task_examples(arith, "train", max_examples=20):
        out = t(ex)
        assert not (out.segments > 0).any()
        assert np.array_equal(out.tokens[out.segments == ANSWER], ex.tokens[ex.segments == ANSWER])
        assert (out.segments == PAUSE).sum() == 2


def test_loader_order_and_resume_match_the_pretraining_loader(arith):
    kw = dict(micro_batch_size=4, grad_accum=2, dp_rank=1, dp_size=2, seed=5, prefetch=0)
    base = iter(ResumableLoader(arith, **kw))
    task = TaskLoader(arith, pause_count=2, **kw)
    it = iter(task)
    for _ in range(3):
        b, t = next(base), next(it)
        assert [torch.equal(x.sample_ids, y.sample_ids) for x, y in zip(b, t)] == [True, True]
    state = task.state_dict()
    want = next(it)
    again = TaskLoader(arith, pause_count=2, **kw)
    again.load_state_dict(state)
    got = next(iter(again))
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(want, got))


def test_bad_pause_settings_are_clear_errors(arith):
    ex = next(iter(task_examples(arith, "train", max_examples=1)))
    with pytest.raises(RdptConfigError, match="data.pause.count"):
        insert_pauses(ex, -1, "random", PAUSE_ID)
    with pytest.raises(RdptConfigError, match="placement"):
        insert_pauses(ex, 1, "middle", PAUSE_ID)
    with pytest.raises(RdptDataError, match="reserve"):
        collate([insert_pauses(ex, 200, "before_answer", PAUSE_ID)], 40, 1)


def test_a_pretraining_dataset_is_refused_by_the_task_loader(tiny_dataset):
    with pytest.raises(RdptConfigError, match="not a task dataset"):
        TaskLoader(tiny_dataset, micro_batch_size=2)
