"""Pause tokens (data.pause): inserted exactly where asked, no loss on them and nothing else
masked; the task loader's order and resume are the pretraining loader's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_model_reference import tp1  # noqa: F401  (fixture)

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


def test_task_loss_is_the_mean_over_trained_targets_only(arith, tp1):
    import json

    from test_model import build, small_cfg

    from pipeline.training.stages.task import masked_loss

    vocab = json.loads((arith / "manifest.json").read_text())["vocab_size"]
    model = build(small_cfg(vocab_size=vocab, max_seq_len=128))
    examples = list(task_examples(arith, "train", max_examples=4))
    tb = collate([insert_pauses(ex, 3, "random", PAUSE_ID, 1) for ex in examples], 96, 1)

    class Cfg:  # the two settings masked_loss reads
        class run:
            seed = 0

    loss = masked_loss(model, tb, r=2, n_grad=2, cfg=Cfg, device=torch.device("cpu"))
    logits = model(tb.inputs, r=2, state_init="random", state_seed=0,
                   sample_ids_B=tb.sample_ids).logits_BSV  # fmt: skip
    trained = tb.targets >= 0
    want = torch.nn.functional.cross_entropy(logits[trained].float(), tb.targets[trained])
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert trained.sum() < tb.targets.numel() / 2  # question, pauses and padding left out


def test_stage_and_dataset_mismatches_are_refused_before_start(arith, tiny_dataset, tmp_path):
    from pipeline.training.config import TrainConfig
    from pipeline.training.resolve import resolve

    def cfg(path, **kw):
        return TrainConfig(
            data={"path": str(path), **kw.pop("data", {})}, run={"dir": str(tmp_path)},
            eval={"interval": 0}, train={"global_batch_size": 4, **kw.pop("train", {})},
        )  # fmt: skip

    with pytest.raises(RdptConfigError, match="needs a task dataset"):
        resolve(cfg(tiny_dataset, train={"stage": "task"}), 1)
    with pytest.raises(RdptConfigError, match="data.pause"):
        resolve(cfg(arith, data={"pause": {"count": 2}}), 1)  # pretrain stage
    resolve(cfg(arith, train={"stage": "task"}, data={"pause": {"count": 2}}), 1)


def test_task_stage_trains_with_pauses_and_generate_appends_them(arith, tmp_path):
    import json
    import subprocess
    import sys

    from fixtures_training import REPO, training_env

    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "pipeline", "train", str(REPO / "configs/train/task-tiny.yaml"),
        f"data.path={arith}", f"run.dir={run_dir}", "tracking.enabled=false",
        "train.max_steps=3", "train.global_batch_size=8", "train.micro_batch_size=4",
        "data.reasoning_steps=drop", "data.pause.count=3", "data.pause.placement=random",
        "train.log_interval=1", "--nproc", "2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=training_env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(ln).get("train/loss") for ln in (run_dir / "metrics.jsonl").open()]
    assert len([x for x in losses if x is not None]) == 3
    out = tmp_path / "gen.json"
    gen = [
        sys.executable, "-m", "pipeline", "generate", str(run_dir), "--prompt",
        "a = 3 ; b = a + 4 ? b", "--pause", "3", "-r", "2", "--max-new-tokens", "4",
        "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(gen, cwd=REPO, env=training_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["prompt_tokens"] == 11 + 3 and res["config"]["pause"] == 3
