"""The recurrent-depth model on real megatron-core modules (CPU, fp32, TP=1 in-process)."""

from __future__ import annotations

import math

import pytest
import torch
from test_model_reference import huginn_forward, tp1  # noqa: F401  (tp1 is a fixture)

from pipeline.common.config_io import load_config
from pipeline.common.errors import RdptConfigError
from pipeline.model import ModelConfig, build_model
from pipeline.model.consolidated import consolidated_name, full_state_dict
from pipeline.model.counting import closed_form_parameters, count_parameters_meta
from pipeline.model.hf_convert import config_to_hf, rdpt_to_hf

PRESETS = [
    "configs/model/huginn-3.5b.yaml",
    "configs/model/bench-0.7b.yaml",
    "configs/model/tiny.yaml",
]


def small_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=96,
        hidden_size=64,
        num_heads=4,
        ffn_hidden_size=160,
        n_prelude=1,
        n_core=2,
        n_coda=1,
        max_seq_len=64,
        attention_backend="math",
    )
    base.update(kw)
    return ModelConfig(**base)


def build(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    # Non-trivial norms and qk_bias (they start at 1 / 0), so the test sees their effect.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("qk_bias"):
                p.normal_(0, 0.1)
            elif "norm" in name or name.startswith("ln_f"):
                p.normal_(1.0, 0.1)
    return model


def batch(cfg, B=2, S=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    return ids, labels


# ---------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("path", PRESETS)
def test_preset_parameter_counts_match_formulas(tp1, path):
    cfg = load_config(ModelConfig, path)
    counts = count_parameters_meta(cfg)
    h, f, V = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    per_layer = 4 * h * h + 3 * h * f + 4 * h + 2 * h  # qkv+proj, fc+proj, 4 norms, qk_bias
    assert counts["prelude"] == cfg.n_prelude * per_layer
    assert counts["core"] == cfg.n_core * per_layer
    assert counts["coda"] == cfg.n_coda * per_layer
    assert counts["adapter"] == 2 * h * h
    assert counts["embedding"] == V * h
    assert counts["head"] == (0 if cfg.tie_embeddings else V * h)
    assert counts == closed_form_parameters(cfg)
    if "huginn" in path:
        assert per_layer == 395_398_080 and counts["adapter"] == 55_756_800
        assert counts["embedding"] == 346_030_080
        assert counts["total"] == 3_564_976_800


def test_prenorm_untied_variant_counts_and_runs(tp1):
    cfg = small_cfg(layer_type="prenorm", tie_embeddings=False, qk_bias=False)
    counts = count_parameters_meta(cfg)
    assert counts == closed_form_parameters(cfg)
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    assert counts["core"] == cfg.n_core * (4 * h * h + 3 * h * f + 2 * h)
    assert counts["head"] == cfg.vocab_size * h
    model = build(cfg)
    ids, labels = batch(cfg)
    out = model(ids, labels, r=3, backprop_depth=2)
    out.loss_BS.mean().backward()
    assert model.output_layer.weight.grad.abs().sum() > 0
    assert model.core_block.layers[0].norm_2 is None


def test_model_info_cli_prints_huginn_total(tp1, capsys):
    from pipeline.cli import main

    assert main(["model-info", "configs/model/huginn-3.5b.yaml", "--r", "32", "--k", "8"]) == 0
    out = capsys.readouterr().out
    assert "3,564,976,800" in out and "closed-form formula agrees: True" in out


def test_flops_per_token_follows_performance_md():
    from pipeline.model.flops import flops_per_token

    cfg = load_config(ModelConfig, "configs/model/bench-0.7b.yaml")
    d, f, V, S = 2048, 5632, 65536, 4096
    fl = 2 * (4 * d * d + 3 * d * f) + 2 * S * d
    expect = 3 * 4 * fl + 3 * 2 * d * V + (3 * 8 + 24) * (4 * fl + 4 * d * d)
    assert flops_per_token(cfg, 32, 8, S) == expect
    # r < k: every iteration carries gradients
    expect_r4 = 3 * 4 * fl + 3 * 2 * d * V + 3 * 4 * (4 * fl + 4 * d * d)
    assert flops_per_token(cfg, 4, 8, S) == expect_r4


# ---------------------------------------------------------------------- architecture
def test_matches_independent_reference_with_truncated_backprop(tp1):
    """Logits at several r and the gradients of a truncated-backprop step equal the plain
    PyTorch reference (HF layout, hand-built detach) in fp32."""
    cfg = small_cfg()
    model = build(cfg)
    hf_cfg = config_to_hf(cfg)
    ids, labels = batch(cfg)
    hf_sd = {
        k: v.clone().requires_grad_(k != "freqs_cis")
        for k, v in rdpt_to_hf(full_state_dict(model), cfg).items()
    }
    hf_sd["lm_head.weight"] = hf_sd["transformer.wte.weight"]  # tied
    for r in (1, 3, 6):
        with torch.no_grad():
            out = model(ids, r=r, state_seed=7, sample_ids_B=[3, 4])
            s0 = model.initial_state(model.prelude(ids), "random", 7, [3, 4]).transpose(0, 1)
            ref = huginn_forward(hf_sd, hf_cfg, ids, r, s0)
        assert out.logits_BSV.shape == (2, 12, cfg.vocab_size)
        torch.testing.assert_close(out.logits_BSV, ref, atol=2e-5, rtol=1e-5)

    r, k = 5, 2
    out = model(ids, labels, r=r, backprop_depth=k, state_seed=7, sample_ids_B=[3, 4])
    out.loss_BS.mean().backward()
    with torch.no_grad():
        s0 = model.initial_state(model.prelude(ids), "random", 7, [3, 4]).transpose(0, 1)
    logits = huginn_forward(hf_sd, hf_cfg, ids, r, s0, backprop_depth=k)
    ref_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, cfg.vocab_size), labels.reshape(-1), reduction="none"
    )
    torch.testing.assert_close(out.loss_BS.reshape(-1), ref_loss, atol=2e-5, rtol=1e-5)
    ref_loss.mean().backward()
    grads = {consolidated_name(n): p.grad for n, p in model.named_parameters()}
    ref_grads = rdpt_to_hf_grads(hf_sd, cfg)
    for name, g in grads.items():
        assert g is not None, name
        torch.testing.assert_close(g, ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)
    assert grads["prelude_block.0.mlp.linear_fc1.weight"].abs().sum() > 0  # through e


def rdpt_to_hf_grads(hf_sd, cfg):
    from pipeline.model.hf_convert import hf_to_rdpt

    g = {k: v.grad for k, v in hf_sd.items() if k not in ("freqs_cis", "lm_head.weight")}
    return hf_to_rdpt(g, cfg)


def test_gradients_only_reach_the_last_k_iterations(tp1):
    """Changing the state before the graded iterations changes no gradient path: the loss
    gradient w.r.t. a no-grad iteration's output does not exist, and k >= r equals full BPTT."""
    cfg = small_cfg()
    model = build(cfg)
    ids, labels = batch(cfg)
    e = model.prelude(ids)
    s = model.initial_state(e, "random", 0).requires_grad_(True)
    # k = 2 of r = 4 through the decomposed API: the first 2 iterations under no_grad.
    with torch.no_grad():
        s_mid = model.core_step(model.core_step(s, e), e)
    assert not s_mid.requires_grad
    full = model(ids, labels, r=4, backprop_depth=None)
    same = model(ids, labels, r=4, backprop_depth=4)
    torch.testing.assert_close(full.loss_BS, same.loss_BS, atol=0, rtol=0)
    g_full = torch.autograd.grad(full.loss_BS.mean(), model.adapter.weight)[0]
    g_same = torch.autograd.grad(same.loss_BS.mean(), model.adapter.weight)[0]
    torch.testing.assert_close(g_full, g_same, atol=0, rtol=0)
    trunc = model(ids, labels, r=4, backprop_depth=1)
    g_trunc = torch.autograd.grad(trunc.loss_BS.mean(), model.adapter.weight)[0]
    torch.testing.assert_close(trunc.loss_BS, full.loss_BS, atol=0, rtol=0)  # same forward
    assert not torch.allclose(g_trunc, g_full)  # fewer paths


def test_core_loop_equals_unrolled_layers_with_shared_weights(tp1):
    """Looping the core r times == r unrolled copies of the core layers holding the same
    weights; the shared weight's gradient is the sum of the copies' gradients."""
    from megatron.core.transformer.spec_utils import build_module

    from pipeline.model.layers import layer_spec

    cfg = small_cfg()
    model = build(cfg)
    ids, labels = batch(cfg)
    r = 3
    out = model(ids, labels, r=r, state_init="zero")
    out.loss_BS.sum().backward()

    from pipeline.model import normal_init

    unrolled = torch.nn.ModuleList(
        build_module(
            layer_spec(cfg.layer_type),
            model.config,
            eps=cfg.norm_eps,
            qk_bias=cfg.qk_bias,
            backend="math",
            output_init_method=normal_init(0.02),
        )
        for _ in range(r * cfg.n_core)
    )
    for i, layer in enumerate(unrolled):
        layer.load_state_dict(model.core_block.layers[i % cfg.n_core].state_dict())
    e = model.prelude(ids)
    s = torch.zeros_like(e)
    rope = model._rope(e.shape[0], 0, e.device)
    for it in range(r):
        x, _ = model.adapter(torch.cat([s, e], dim=-1))  # tp=1: no scatter needed
        for layer in unrolled[it * cfg.n_core : (it + 1) * cfg.n_core]:
            x, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
        s = x
    logits = model.coda(s)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, cfg.vocab_size), labels.reshape(-1), reduction="sum"
    )
    torch.testing.assert_close(loss, out.loss_BS.sum(), atol=1e-4, rtol=1e-6)
    loss.backward()
    for j in range(cfg.n_core):
        for name, p in model.core_block.layers[j].named_parameters():
            copies = [
                dict(unrolled[it * cfg.n_core + j].named_parameters())[name].grad for it in range(r)
            ]
            torch.testing.assert_close(p.grad, sum(copies), atol=1e-5, rtol=1e-5)


def test_recompute_is_exact(tp1):
    from pipeline.training.parallel import checkpointed

    cfg = small_cfg()
    ids, labels = batch(cfg)
    results = []
    for recompute in (False, True):
        model = build(cfg, seed=3)
        if recompute:
            model.wrap_iteration(checkpointed)
        out = model(ids, labels, r=4, backprop_depth=3, state_seed=1)
        out.loss_BS.mean().backward()
        results.append((out.loss_BS.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


def test_sdpa_and_math_backends_agree_and_cached_forward_equals_full(tp1):
    from pipeline.model.kv_cache import KVCache

    cfg = small_cfg()
    ids, _ = batch(cfg, S=10)
    r = 3
    logits = {}
    for backend in ("math", "sdpa"):
        model = build(cfg.model_copy(update={"attention_backend": backend}), seed=5)
        with torch.no_grad():
            full = model(ids, r=r, state_init="zero").logits_BSV
            # Incremental: prefill 6 tokens, then one token at a time, cache slot = iteration.
            cache = KVCache()
            steps = []
            for start, end in [(0, 6)] + [(t, t + 1) for t in range(6, 10)]:
                e = model.prelude(ids[:, start:end], kv_cache=cache, position_offset=start)
                s = torch.zeros_like(e)
                for i in range(r):
                    s = model.core_step(s, e, kv_cache=cache, cache_slot=i, position_offset=start)
                steps.append(model.coda(s, kv_cache=cache, position_offset=start))
            inc = torch.cat(steps, dim=1)
        torch.testing.assert_close(inc, full, atol=2e-5, rtol=1e-5)
        assert len(cache) == cfg.n_prelude + r * cfg.n_core + cfg.n_coda
        logits[backend] = full
    torch.testing.assert_close(logits["sdpa"], logits["math"], atol=2e-5, rtol=1e-5)


def test_kv_cache_overwrites_shared_slots_and_fills_gaps_from_latest_slot():
    from pipeline.model.kv_cache import KVCache

    cache = KVCache()
    t = lambda v, n=1: torch.full((n, 1, 2, 4), float(v))  # noqa: E731
    cache.update(("core", 0, 0), t(1, 3), t(1, 3), offset=0)  # prefill 3 positions, slot 0
    cache.update(("core", 1, 0), t(2, 3), t(2, 3), offset=0)  # slot 1
    k, _ = cache.update(("core", 0, 0), t(5), t(5), offset=3)  # token 3, slot 0
    assert k.shape[0] == 4 and k[3].eq(5).all() and k[:3].eq(1).all()
    k, _ = cache.update(("core", 0, 0), t(6), t(6), offset=3)  # same slot again: overwrite
    assert k.shape[0] == 4 and k[3].eq(6).all()
    assert torch.equal(cache.get(("core", 0, 0))[0], k) and cache.length(("core", 1, 0)) == 3
    # slot 1 never saw token 3 (that token exited early): filled from the latest slot (0).
    k, _ = cache.update(("core", 1, 0), t(7), t(7), offset=4)
    assert k.shape[0] == 5 and k[3].eq(6).all() and k[4].eq(7).all() and k[:3].eq(2).all()
    with pytest.raises(ValueError, match="no other slot"):
        cache.update(("coda", 0, 0), t(1), t(1), offset=2)


def test_initial_state_depends_only_on_seed_and_sample_id(tp1):
    cfg = small_cfg()
    model = build(cfg)
    ids, _ = batch(cfg, B=3)
    with torch.no_grad():
        e = model.prelude(ids)
        s_a = model.initial_state(e, "random", 11, [7, 3, 5])
        s_b = model.initial_state(e[:, :2], "random", 11, [5, 9])
        assert torch.equal(s_a[:, 2], s_b[:, 0])  # sample 5, wherever it sits in the batch
        assert not torch.equal(s_a[:, 0], s_a[:, 1])
        std = math.sqrt(2 / (5 * cfg.hidden_size))
        assert s_a.abs().max() <= 3 * std * math.sqrt(cfg.hidden_size) + 1e-6
        # std of a normal truncated at +-3 std is 0.9866 of the untruncated one
        assert abs(s_a.std().item() / (0.9866 * std * math.sqrt(cfg.hidden_size)) - 1) < 0.05
        z1 = model(ids, r=3, state_init="zero", state_seed=1).logits_BSV
        z2 = model(ids, r=3, state_init="zero", state_seed=2).logits_BSV
        assert torch.equal(z1, z2)
        r1 = model(ids, r=1, state_seed=1).logits_BSV
        r2 = model(ids, r=1, state_seed=2).logits_BSV
        assert (r1 - r2).abs().max() > 1e-4
        assert torch.equal(model.initial_state(e, "zero"), torch.zeros_like(e))


def test_telemetry_reports_per_iteration_change_and_state_cosine(tp1):
    cfg = small_cfg()
    model = build(cfg)
    ids, labels = batch(cfg)
    out = model(ids, labels, r=5, backprop_depth=2, telemetry=True)
    tel = out.telemetry
    assert tel["rel_change"].shape == (5,) and torch.isfinite(tel["rel_change"]).all()
    assert -1.0 <= tel["state_cosine"].item() <= 1.0
    # Collapse detector: identical token states give cosine 1.
    from pipeline.model.recurrent import mean_pairwise_cosine

    same = torch.randn(1, 2, 8).expand(6, 2, 8)
    assert abs(mean_pairwise_cosine(same).item() - 1.0) < 1e-5


# ---------------------------------------------------------------------- config errors
def test_bad_configs_give_clear_errors(tmp_path):
    with pytest.raises(RdptConfigError, match="model.num_heads"):
        small_cfg(hidden_size=66, num_heads=4)
    with pytest.raises(RdptConfigError, match="parallel.tp"):
        small_cfg().check(tp=3)
    from pipeline.training.layout import ParallelDims

    with pytest.raises(RdptConfigError, match="world_size=4, tp=3"):
        ParallelDims(world_size=4, tp=3)
    with pytest.raises(RdptConfigError, match="model.num_heads 4"):
        ParallelDims(world_size=8, tp=8).check_model(small_cfg())
    with pytest.raises(RdptConfigError, match="model.num_heads"):
        load_config(ModelConfig, "configs/model/tiny.yaml", ["num_heads=5"])
    from pipeline.model.depth import split_steps
    from pipeline.training.recurrence import RecurrenceConfig

    with pytest.raises(RdptConfigError, match="recurrence.backprop_depth"):
        RecurrenceConfig(backprop_depth=0)
    with pytest.raises(RdptConfigError, match="backprop_depth"):
        split_steps(4, 0)
    with pytest.raises(RdptConfigError, match="unknown key 'n_layers'"):
        load_config(ModelConfig, "configs/model/tiny.yaml", ["n_layers=3"])
