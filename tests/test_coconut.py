"""Continuous thought (Coconut): the cached multi-pass forward equals the pass-by-pass
recomputation, the curriculum builds the right sequences, bad settings are clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_model import build, small_cfg
from test_model_reference import tp1  # noqa: F401  (fixture)

from pipeline.common.errors import RdptConfigError
from pipeline.model.continuous_thought import initial_states, thought_forward
from pipeline.training.config import CoconutSection, TrainConfig

BOT, EOT = 4, 5


def manual_multipass(model, before, n, after, *, r, feedback, seed, sid):
    """Coconut by definition: every pass recomputes the whole sequence so far, no cache.
    (Norms and RoPE run in fp32 inside the fp64 model, hence tolerances of ~1e-6.)"""
    x = model.embed(torch.tensor([before]))
    total = len(before) + n + len(after)
    s0 = initial_states(model, total, "random", seed, sid, x)
    vecs, thoughts = [x], []

    def full(inputs):
        e = model.prelude_embedded(inputs)
        s = s0[: inputs.shape[0]]
        for _ in range(r):
            s = model.core_step(s, e)
        return s, model.coda_hidden(s)

    for _ in range(n):
        s, h = full(torch.cat(vecs))
        fb = (h if feedback == "coda" else s)[-1:]
        thoughts.append(fb[0, 0])
        vecs.append(fb)
    _, h = full(torch.cat([*vecs, model.embed(torch.tensor([after]))]))
    logits = model.head(h[len(before) + n - 1 :])[0]
    return torch.stack(thoughts), logits


@pytest.mark.parametrize("feedback", ["coda", "core"])
def test_cached_thought_forward_equals_manual_multipass_values_and_gradients(tp1, feedback):
    cfg = small_cfg()
    model = build(cfg).double()
    g = torch.Generator().manual_seed(0)
    before = torch.randint(16, cfg.vocab_size, (7,), generator=g).tolist() + [BOT]
    after = [EOT] + torch.randint(16, cfg.vocab_size, (6,), generator=g).tolist()
    mask = [False] + [True] * 6
    n = 3

    out = thought_forward(
        model, before, n, after, mask, r=3, feedback=feedback, state_seed=7, sample_id=11
    )
    out.loss_sum.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    thoughts, logits = manual_multipass(
        model, before, n, after, r=3, feedback=feedback, seed=7, sid=11
    )
    targets = torch.tensor(after)
    loss = torch.nn.functional.cross_entropy(
        logits[: len(after)][torch.tensor(mask)], targets[torch.tensor(mask)], reduction="sum"
    )
    loss.backward()

    assert out.thoughts_SH.shape == (n, cfg.hidden_size) and out.tokens == 6
    torch.testing.assert_close(out.thoughts_SH, thoughts, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits_SV, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss_sum, loss.float(), rtol=1e-5, atol=1e-6)
    for k, p in model.named_parameters():  # gradients reach every pass through the cache
        torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)
    # the thoughts are the fed-back states, not token embeddings: they change the answer
    no_thought = thought_forward(
        model, before, 0, after, mask, r=3, feedback=feedback, state_seed=7, sample_id=11
    )
    assert not torch.allclose(no_thought.logits_SV, out.logits_SV)


@pytest.mark.parametrize("feedback", ["coda", "core"])
def test_batched_thought_loss_equals_the_sum_of_single_sequences(tp1, feedback):
    """Different question lengths (left padding), thought counts (one sequence has none,
    another runs out of thoughts before the others: its tokens share a one-position pass) and
    answer lengths in one batch: loss, count and every gradient equal per-sequence passes."""
    from pipeline.model.continuous_thought import ThoughtSequence, batched_thought_loss

    cfg = small_cfg()
    model = build(cfg).double()
    g = torch.Generator().manual_seed(4)

    def toks(n):
        return torch.randint(16, cfg.vocab_size, (n,), generator=g).tolist()

    seqs = [
        ThoughtSequence(toks(6) + [BOT], 3, [EOT] + toks(4), [False] + [True] * 4, 3),
        ThoughtSequence(toks(3), 0, toks(7), [True, True, False] + [True] * 4, 8),
        ThoughtSequence(toks(9) + [BOT], 1, [EOT] + toks(2), [False, True, True], 21),
    ]
    kw = dict(r=3, n_grad=2, feedback=feedback, state_seed=7)
    loss, count = batched_thought_loss(model, seqs, pad_id=1, **kw)
    loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    ref, ref_count = 0.0, 0
    for q in seqs:
        out = thought_forward(model, q.before, q.n_thoughts, q.after, q.after_mask,
                              sample_id=q.sample_id, **kw)  # fmt: skip
        ref, ref_count = ref + out.loss_sum, ref_count + out.tokens
    ref.backward()
    assert count == ref_count == 12
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_zero_thoughts_equals_the_models_own_forward(tp1):
    cfg = small_cfg()
    model = build(cfg).double()
    ids = torch.randint(16, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    ref = model(ids, r=4, state_init="random", state_seed=3, sample_ids_B=[5]).logits_BSV[0]
    out = thought_forward(model, ids[0, :5], 0, ids[0, 5:], r=4, state_seed=3, sample_id=5)
    torch.testing.assert_close(out.logits_SV[:-1], ref[4:-1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits_SV[-1], ref[-1], rtol=1e-5, atol=1e-6)


def _example():
    # question (3 tokens), step 1 (2), step 2 (2), step 3 (2), answer (3: "=> 7 <eot>")
    segments = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -2, -2])
    tokens = np.arange(20, 20 + len(segments))
    tokens[-2:] = 1  # padding
    mask = (segments > 0) | (segments == -1)
    return tokens, segments, mask


def test_curriculum_replaces_the_first_k_steps_by_k_times_c_thoughts():
    from pipeline.training.stages.coconut import coconut_sequence

    tokens, segments, mask = _example()
    before, n, after, am = coconut_sequence(tokens, segments, mask, 0, 2, BOT, EOT)
    assert n == 0 and list(before) == [20, 21, 22]  # stage 0: the chain of thought
    assert list(after) == list(range(23, 32)) and am.all()
    for k in (1, 2, 3, 5):  # 5: beyond this example's steps: all 3 replaced
        before, n, after, am = coconut_sequence(tokens, segments, mask, k, 2, BOT, EOT)
        kk = min(k, 3)
        assert list(before) == [20, 21, 22, BOT] and n == 2 * kk
        assert list(after) == [EOT, *range(23 + 2 * kk, 32)]
        assert list(am) == [False] + [True] * (len(after) - 1)  # no loss on <|end_thought|>
    _, n, _, _ = coconut_sequence(tokens, segments, mask, 2, 0, BOT, EOT)
    assert n == 0  # c = 0: the steps are removed, the markers stay
    # pad_thoughts: stage x c thoughts also where the example has fewer steps (3 here)
    before, n, after, _ = coconut_sequence(tokens, segments, mask, 5, 2, BOT, EOT, pad=True)
    assert n == 10 and list(after) == [EOT, 29, 30, 31]
    _, n, _, _ = coconut_sequence(tokens, segments, mask, 2, 2, BOT, EOT, pad=True)
    assert n == 4


def test_stage_follows_the_epoch():
    c = CoconutSection(thoughts_per_step=1, max_stages=3, epochs_per_stage=2)
    assert [c.stage_at(e) for e in range(9)] == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    # by optimizer step, starting from stage 1 (a chain-of-thought model as init_from)
    c = CoconutSection(max_stages=3, steps_per_stage=5, first_stage=1, epochs_per_stage=1)
    assert [c.stage_at(9, s) for s in (0, 4, 5, 9, 10, 14, 15, 99)] == [1, 1, 2, 2, 3, 3, 3, 3]


def test_bad_coconut_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="thoughts_per_step.*>= 0, got -1"):
        CoconutSection(thoughts_per_step=-1)
    with pytest.raises(ValueError, match="epochs_per_stage"):
        CoconutSection(epochs_per_stage=0)
    with pytest.raises(ValueError, match="steps_per_stage"):
        CoconutSection(steps_per_stage=0)
    with pytest.raises(ValueError, match="first_stage=4 is beyond coconut.max_stages=3"):
        CoconutSection(first_stage=4, max_stages=3)
    with pytest.raises(ValueError, match="count must be >= 0"):
        thought_forward(None, [1], -1, [2], r=1)

    from data_prep.task_prep import TaskPrepConfig, prepare_task
    from pipeline.training.resolve import resolve

    data = tmp_path / "arith"
    prepare_task(
        TaskPrepConfig(
            task="arithmetic",
            output=str(data),
            sizes={"train": 40, "val": 4, "test": 4},
            arithmetic={"steps": [1, 3]},
        )
    )
    base = {
        "data": {"path": str(data)},
        "train": {"stage": "coconut", "global_batch_size": 4},
        "run": {"dir": str(tmp_path / "run")},
        "eval": {"interval": 0},
    }
    with pytest.raises(RdptConfigError, match="max_stages=4.*at most 3 steps"):
        resolve(TrainConfig(**base, coconut={"max_stages": 4}), 1)
    with pytest.raises(RdptConfigError, match="ZeRO-3"):
        resolve(TrainConfig(**base, parallel={"zero_stage": 3}), 1)
    resolve(TrainConfig(**base, coconut={"max_stages": 3}), 1)  # the largest stage that fits
