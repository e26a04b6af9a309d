"""Evaluation and generation algorithms on tiny random models built with build_model (no
training needed): the depth sweep matches the model's own forward, adaptive exit limits,
cached generation against uncached recomputation, KV-cache sharing, sampling."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures_model import SMALL_VOCAB

from pipeline.eval.adaptive import ExitRule, evaluate_adaptive, score_tokens
from pipeline.eval.depth import evaluate_depths, sweep_depths
from pipeline.eval.generate import (
    GenerationConfig,
    generate,
    generate_uncached,
    greedy_ids,
    sample_next,
)

VOCAB = SMALL_VOCAB  # the vocabulary of small_eval_model


@pytest.fixture(scope="module")
def tiny_model(small_eval_model):  # tests/fixtures_model.py
    return small_eval_model


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (6, 25), generator=g)
    return [(x[:4, :-1], x[:4, 1:], torch.arange(4)), (x[4:, :-1], x[4:, 1:], torch.arange(4, 6))]


def _forward_loss(model, batches, r, state_init, seed):
    tot, n = 0.0, 0
    with torch.no_grad():
        for inputs, targets, ids in batches:
            out = model(
                inputs,
                targets,
                r=r,
                state_init=state_init,
                state_seed=seed,
                sample_ids_B=ids,
            )
            tot += out.loss_BS.double().sum().item()
            n += targets.numel()
    return tot / n


@pytest.mark.parametrize("state_init", ["random", "zero"])
def test_one_pass_sweep_equals_separate_forwards(tiny_model, batches, state_init):
    rs = [1, 3, 6]
    losses = evaluate_depths(tiny_model, batches, rs, state_init, seed=5)
    assert sorted(losses) == rs
    for r in rs:
        assert losses[r] == pytest.approx(
            _forward_loss(tiny_model, batches, r, state_init, 5), rel=1e-5
        )


def test_seed_changes_random_state_only(tiny_model, batches):
    for state_init, differs in (("random", True), ("zero", False)):
        a = evaluate_depths(tiny_model, batches, [3], state_init, seed=5)[3]
        b = evaluate_depths(tiny_model, batches, [3], state_init, seed=6)[3]
        assert (a != pytest.approx(b, rel=1e-7)) == differs, state_init


def test_sweep_telemetry_and_training_flag_restored(tiny_model, batches):
    tiny_model.train()
    try:
        sw = sweep_depths(
            tiny_model, batches, [2, 5], "random", 0, telemetry=True, loss_every_iteration=True
        )
        assert tiny_model.training  # restored
    finally:
        tiny_model.eval()
    tel = sw.telemetry
    assert tel["iteration"] == [1, 2, 3, 4, 5]
    assert len(tel["rel_change"]) == len(tel["state_cosine"]) == len(tel["loss"]) == 5
    assert all(v > 0 and math.isfinite(v) for v in tel["rel_change"])
    assert all(-1.0 <= v <= 1.0 for v in tel["state_cosine"])
    assert tel["loss"][1] == pytest.approx(sw.loss[2], rel=1e-9)
    assert tel["loss"][4] == pytest.approx(sw.loss[5], rel=1e-9)
    assert sw.tokens == sum(t.numel() for _, t, _ in batches)
    d = sw.to_dict()
    assert d["depth"]["5"]["ppl"] == pytest.approx(math.exp(sw.loss[5]))


def test_bad_recurrences_and_state_init(tiny_model, batches):
    with pytest.raises(ValueError, match="r must be >= 1, got 0"):
        evaluate_depths(tiny_model, batches, [0, 4])
    with pytest.raises(ValueError, match="state_init"):
        evaluate_depths(tiny_model, batches, [1], state_init="noise")
    with pytest.raises(ValueError, match="exit criterion"):
        ExitRule("perplexity", 1.0)


@pytest.mark.parametrize("criterion", ["kl", "entropy", "state"])
def test_adaptive_exit_limits(tiny_model, batches, criterion):
    max_r = 6
    n_tok = sum(t.numel() for _, t, _ in batches)
    fixed = sweep_depths(
        tiny_model, batches, range(1, max_r + 1), "random", 3, loss_every_iteration=True
    ).telemetry["loss"]
    never = evaluate_adaptive(
        tiny_model,
        batches,
        rule=ExitRule(criterion, 0.0),
        max_r=max_r,
        state_init="random",
        seed=3,
        fixed_curve=fixed,
    )
    assert never.histogram == [0] * (max_r - 1) + [n_tok]
    assert never.mean_depth == max_r
    assert never.loss == pytest.approx(fixed[max_r - 1], rel=1e-6)
    assert never.compute_saved_vs_max_r == 0.0
    at_once = evaluate_adaptive(
        tiny_model,
        batches,
        rule=ExitRule(criterion, 1e30),
        max_r=max_r,
        state_init="random",
        seed=3,
        fixed_curve=fixed,
    )
    assert at_once.histogram == [n_tok] + [0] * (max_r - 1)
    assert at_once.mean_depth == 1.0
    assert at_once.loss == pytest.approx(fixed[0], rel=1e-6)
    assert at_once.equal_loss_r is not None
    assert at_once.fixed_loss[at_once.equal_loss_r - 1] <= at_once.loss * (1 + 1e-6)


def test_adaptive_histogram_sums_to_token_count(tiny_model, batches):
    # a threshold in the middle of the observed KL range: some tokens exit early, some not
    res = evaluate_adaptive(
        tiny_model, batches, rule=ExitRule("state", 0.9), max_r=8, state_init="zero", seed=0
    )
    n_tok = sum(t.numel() for _, t, _ in batches)
    assert sum(res.histogram) == res.tokens == n_tok
    assert res.mean_depth == pytest.approx(
        sum((d + 1) * c for d, c in enumerate(res.histogram)) / n_tok
    )
    d = res.to_dict()
    assert sum(d["histogram"].values()) == n_tok


def test_score_tokens_fixed_matches_forward(tiny_model, batches):
    inputs, targets, ids = batches[0]
    targets = targets.clone()
    targets[:, :5] = -100
    with torch.no_grad():
        sc = score_tokens(tiny_model, inputs, targets, max_r=4, state_init="zero")
        out = tiny_model(inputs, targets, r=4, state_init="zero")
    assert torch.allclose(-sc.logprob, out.loss_BS, atol=1e-5)
    assert not sc.greedy[:, :5].any()
    assert (sc.depth == 4).all()


@pytest.mark.parametrize("r", [1, 5])
def test_cached_generation_equals_uncached_recomputation(tiny_model, r):
    prompt = [3, 14, 15, 9, 26, 5]
    ref = generate_uncached(tiny_model, prompt, 8, r, state_init="zero")
    res = generate(tiny_model, prompt, GenerationConfig(max_new_tokens=8, r=r))
    assert res.new_ids == ref
    assert res.depths == [r] * 8 and res.mean_depth == r
    assert res.tokens_per_s > 0


def test_kv_sharing_with_budget_at_least_r_equals_no_sharing(tiny_model):
    prompt = [7, 1, 8, 2, 8]
    base = generate(tiny_model, prompt, GenerationConfig(max_new_tokens=8, r=6))
    for k in (6, 9):
        shared = generate(tiny_model, prompt, GenerationConfig(max_new_tokens=8, r=6, kv_budget=k))
        assert shared.new_ids == base.new_ids


def test_kv_budget_bounds_cache_slots(tiny_model, monkeypatch):
    from pipeline.eval import decode

    caches = []
    orig = decode.StaticKVCache.for_model

    def spy(*args, **kwargs):
        caches.append(orig(*args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(decode.StaticKVCache, "for_model", spy)
    generate(tiny_model, [1, 2, 3], GenerationConfig(max_new_tokens=4, r=12, kv_budget=3))
    core_slots = {slot for block, slot in caches[0]._views if block == "core"}
    assert core_slots == {0, 1, 2}


def test_adaptive_generation_and_continuous_cot(tiny_model):
    prompt = [2, 7, 1, 8]
    never = generate(
        tiny_model,
        prompt,
        GenerationConfig(max_new_tokens=6, r=5, exit_rule=ExitRule("kl", 0.0)),
    )
    fixed = generate(tiny_model, prompt, GenerationConfig(max_new_tokens=6, r=5))
    assert never.new_ids == fixed.new_ids and never.depths == fixed.depths
    fast = generate(
        tiny_model,
        prompt,
        GenerationConfig(
            max_new_tokens=6,
            r=5,
            kv_budget=2,
            exit_rule=ExitRule("kl", 1e30),
            continuous_cot=True,
        ),
    )
    # the prompt is prefilled at the full r; every generated position exits after one iteration
    assert fast.depths == [5] + [1] * 5
    assert len(fast.new_ids) == 6


def test_sampling_greedy_temperature_top_p():
    logits = torch.tensor([[0.0, 5.0, 1.0, -2.0]])
    assert sample_next(logits).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    # top_p tiny keeps only the most likely token whatever the temperature
    assert all(sample_next(logits, 5.0, 1e-6, g).item() == 1 for _ in range(20))
    draws = {sample_next(logits, 10.0, 1.0, g).item() for _ in range(200)}
    assert len(draws) >= 3
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ValueError, match="r: the number of core iterations"):
        GenerationConfig(r=0)


@pytest.mark.gpu
def test_cuda_sweep_and_generation_match_cpu(tiny_model, batches):
    cpu = evaluate_depths(tiny_model, batches, [1, 4], "zero")
    prompt = [5, 6, 7, 8]
    ref = generate(tiny_model, prompt, GenerationConfig(max_new_tokens=6, r=4)).new_ids
    tiny_model.cuda()
    try:
        gpu = evaluate_depths(tiny_model, batches, [1, 4], "zero")
        res = generate(tiny_model, prompt, GenerationConfig(max_new_tokens=6, r=4))
    finally:
        tiny_model.cpu()
    for r in (1, 4):
        assert gpu[r] == pytest.approx(cpu[r], rel=1e-4)
    assert res.new_ids == ref


def test_exit_curves_one_point_per_threshold_and_plot(tiny_model, batches, tmp_path):
    from pipeline.eval.adaptive import exit_curves
    from pipeline.tracking.plots import drawn, plot_loss_vs_mean_depth

    fixed = sweep_depths(tiny_model, batches, [6], "zero", loss_every_iteration=True)
    fixed_curve = fixed.telemetry["loss"]
    thresholds = {"kl": (1e-1, 3e-2, 1e-4), "entropy": (5.0, 4.4, 0.1), "state": (0.5, 0.3, 1e-3)}
    curves = exit_curves(
        tiny_model,
        batches,
        max_r=6,
        fixed_curve=fixed_curve,
        state_init="zero",
        thresholds=thresholds,
    )
    assert set(curves) == {"kl", "entropy", "state"}
    for criterion, points in curves.items():
        assert [p["threshold"] for p in points] == list(thresholds[criterion])
        depths = [p["mean_depth"] for p in points]
        # a lower threshold never exits earlier: mean depth grows as the threshold falls
        assert depths == sorted(depths) and depths[0] < depths[-1]
        for p in points:
            single = evaluate_adaptive(
                tiny_model,
                batches,
                rule=ExitRule(criterion, p["threshold"]),
                max_r=6,
                state_init="zero",
                fixed_curve=fixed_curve,
            )
            assert p["loss"] == single.loss and p["mean_depth"] == single.mean_depth
            if p["equal_loss_r"] is not None:
                assert p["compute_saved"] == pytest.approx(1 - p["mean_depth"] / p["equal_loss_r"])
    png = plot_loss_vs_mean_depth(
        {c: [(p["mean_depth"], p["loss"]) for p in pts] for c, pts in curves.items()},
        dict(enumerate(fixed_curve, start=1)),
        tmp_path / "curve.png",
    )
    (panel,) = drawn(png)
    lines = {ln["label"]: ln for ln in panel["lines"]}
    assert lines["fixed r"]["y"] == pytest.approx(fixed_curve)
    assert lines["kl"]["x"] == sorted(p["mean_depth"] for p in curves["kl"])


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_greedy_ids_equal_torch_argmax_with_ties_and_nan(rows):
    """The blocked CPU argmax picks what torch.argmax picks: the first index of the maximum
    (ties across and inside blocks of 128), a NaN as the maximum, an all -inf row."""
    g = torch.Generator().manual_seed(rows)
    for trial in range(60):
        x = torch.randn(rows, 2048, generator=g)
        if trial % 3 == 0:
            x = (x * 2).round()  # many equal logits
        if trial % 4 == 1:  # the same maximum in two blocks, the later one first written
            x[:, 1500] = x[:, 700] = 50.0
        if trial % 5 == 2:
            x[-1, int(torch.randint(0, 2048, (1,), generator=g))] = float("nan")
        if trial % 7 == 3:
            x[0] = float("-inf")
        assert greedy_ids(x).tolist() == x.argmax(-1).tolist(), trial
    assert greedy_ids(torch.randn(2, 300)).shape == (2,)  # a vocabulary not in whole blocks
