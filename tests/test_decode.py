"""The lean decode loop (pipeline/eval/decode.py) against rdpt's decode before it
(bench/decode_baselines.py::generate_before, the general decomposed API with a growing KVCache)
and a plain-PyTorch decode of the same weights in the published code's style: same tokens and
exit depths for every criterion, KV budget, continuous chain of thought, sampling and batches;
its pieces (RoPE table, static cache, layers called directly) are bitwise the general path's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from fixtures_model import SMALL_VOCAB

from pipeline.eval.adaptive import ExitRule
from pipeline.eval.generate import GenerationConfig, generate, generate_batch

VOCAB = SMALL_VOCAB  # the vocabulary of small_eval_model
PROMPT = [3, 14, 15, 9, 26, 5]


def _load_baselines():
    path = Path(__file__).resolve().parents[1] / "bench" / "decode_baselines.py"
    spec = importlib.util.spec_from_file_location("decode_baselines", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


baselines = _load_baselines()


@pytest.fixture(scope="module")
def model(small_eval_model):  # tests/fixtures_model.py
    return small_eval_model


def _same_as_before(model, cfg, prompt=PROMPT):
    new = generate(model, prompt, cfg)
    old = baselines.generate_before(model, prompt, cfg)
    assert new.new_ids == old.new_ids
    assert new.depths == old.depths
    return new


@pytest.mark.parametrize(
    "kw",
    [
        dict(r=1),
        dict(r=5),
        dict(r=12, kv_budget=4),
        dict(r=6, kv_budget=9),
        dict(r=5, continuous_cot=True),
        dict(r=5, temperature=0.9, top_p=0.8, seed=3),
        dict(r=4, state_init="random", seed=7),
    ],
    ids=["r1", "r5", "budget4", "budget-above-r", "cot", "sampled", "random-init"],
)
def test_fixed_depth_decode_equals_the_decode_before(model, kw):
    res = _same_as_before(model, GenerationConfig(max_new_tokens=12, **kw))
    assert len(res.new_ids) == 12 and res.depths == [kw["r"]] * 12


# thresholds at which this model's tokens exit at mixed depths (checked below)
ADAPTIVE = [("kl", 0.03), ("entropy", 4.4), ("state", 0.3)]


@pytest.mark.parametrize("criterion,threshold", ADAPTIVE)
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(kv_budget=3), dict(continuous_cot=True), dict(kv_budget=2, continuous_cot=True)],
    ids=["plain", "budget3", "cot", "budget2-cot"],
)
def test_adaptive_decode_equals_the_decode_before(model, criterion, threshold, kw):
    cfg = GenerationConfig(max_new_tokens=12, r=8, exit_rule=ExitRule(criterion, threshold), **kw)
    res = _same_as_before(model, cfg)
    assert len(set(res.depths[1:])) > 1, "the threshold must make tokens exit at mixed depths"
    assert min(res.depths) < 8


def test_stop_ids_end_the_decode_as_before(model):
    first = generate(model, PROMPT, GenerationConfig(max_new_tokens=12, r=3)).new_ids
    stop = first[4]
    res = _same_as_before(model, GenerationConfig(max_new_tokens=12, r=3, stop_ids=[stop]))
    assert res.new_ids == first[: first.index(stop) + 1]


def test_batch_rows_equal_single_decodes_and_the_decode_before(model):
    g = torch.Generator().manual_seed(5)
    prompts_BP = torch.randint(0, VOCAB, (3, 7), generator=g)
    cfg = GenerationConfig(max_new_tokens=10, r=6)
    batch = generate_batch(model, prompts_BP, cfg)
    singles = [generate(model, row.tolist(), cfg).new_ids for row in prompts_BP]
    before = baselines.greedy_before(model, prompts_BP, 10, 6)
    assert batch.new_ids == singles == before
    assert batch.depths == [6] * 10 and batch.telemetry is None


def test_reference_style_decode_gives_the_same_greedy_tokens(model):
    ref = baselines.ReferenceStyleLM.from_rdpt(model)
    prompts_BP = torch.tensor([PROMPT, PROMPT[::-1]])
    for r in (1, 4):
        ours = generate_batch(model, prompts_BP, GenerationConfig(max_new_tokens=10, r=r))
        assert ref.greedy(prompts_BP, 10, r) == ours.new_ids


def test_telemetry_is_off_unless_asked(model):
    cfg = GenerationConfig(max_new_tokens=5, r=4)
    assert generate_batch(model, torch.tensor([PROMPT]), cfg).telemetry is None
    tel = generate_batch(model, torch.tensor([PROMPT]), cfg, telemetry=True).telemetry
    # one list per decode step (the prefill and 4 new positions), one value per iteration
    assert len(tel) == 5 and all(len(step) == 4 for step in tel)
    assert all(v > 0 for step in tel for v in step)


def test_rope_slice_is_bitwise_the_layers_rope(model):
    from pipeline.model import compat
    from pipeline.model.rope_table import RopeTable

    table = RopeTable.for_model(model, 40, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for offset, S in ((0, 9), (17, 1), (39, 1)):
        t_SBNh = torch.randn(S, 2, 4, 16, generator=g)
        emb = compat.rope_emb(model.rotary, S, offset, torch.device("cpu"))
        want = compat.apply_rope(t_SBNh, emb, model.config)
        assert torch.equal(table.slice(offset, S).apply(t_SBNh), want)
    with pytest.raises(ValueError, match="capacity 40"):
        table.slice(40, 1)


def test_lean_pieces_are_bitwise_the_general_path(model):
    from pipeline.model.kv_cache import KVCache
    from pipeline.model.lean_forward import LeanForward
    from pipeline.model.rope_table import RopeTable
    from pipeline.model.static_cache import StaticKVCache

    lean = LeanForward(model)
    table = RopeTable.for_model(model, 16, torch.device("cpu"))
    static = StaticKVCache.for_model(model, batch=2, capacity=16, core_slots=2, device="cpu")
    growing = KVCache()
    ids_BS = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        for offset, chunk in ((0, ids_BS[:, :5]), (5, ids_BS[:, 5:6])):
            rope = table.slice(offset, chunk.shape[1])
            for view in (
                static.view("prelude"),
                static.view("coda"),
                *map(static.view, ["core"] * 2, [0, 1]),
            ):
                view.offset = offset
            e_lean = lean.prelude(chunk, rope, static.view("prelude"))
            e_ref = model.prelude(chunk, kv_cache=growing, position_offset=offset)
            assert torch.equal(e_lean, e_ref)
            s_lean = s_ref = torch.zeros_like(e_ref)
            buf = lean.adapter_input(e_lean)
            for i in range(3):
                s_lean = lean.core(s_lean, buf, rope, static.view("core", i % 2))
                s_ref = model.core_step(s_ref, e_ref, growing, i % 2, offset)
                assert torch.equal(s_lean, s_ref)
            logits = lean.coda(s_lean, rope, static.view("coda"))
            assert torch.equal(logits, model.coda(s_ref, growing, offset))


def test_static_cache_holds_min_of_budget_and_r_slots_and_is_allocated_once(model):
    from pipeline.eval.decode import DecodeLoop

    for budget, r, slots in ((3, 12, 3), (None, 4, 4), (9, 5, 5)):
        cfg = GenerationConfig(max_new_tokens=4, r=r, kv_budget=budget)
        loop = DecodeLoop(model, cfg, batch=1, capacity=10, device=torch.device("cpu"))
        assert loop.cache.core_slots == slots
        assert {id(v) for v in loop.core_views} == {
            id(loop.cache.view("core", i)) for i in range(slots)
        }
    # memory depends on the budget, not on r
    sizes = [
        DecodeLoop(
            model, GenerationConfig(r=r, kv_budget=2), batch=1, capacity=10, device="cpu"
        ).cache.memory_bytes()
        for r in (4, 32)
    ]
    assert sizes[0] == sizes[1] > 0
    before = {k: v.k_LCBNh.data_ptr() for k, v in loop.cache._views.items()}
    loop.step(torch.tensor([PROMPT]), 0, None, adaptive=False)
    loop.step(torch.tensor([[1]]), len(PROMPT), None, adaptive=True)
    assert {k: v.k_LCBNh.data_ptr() for k, v in loop.cache._views.items()} == before


@pytest.mark.parametrize("rule", [None, *(ExitRule(c, t) for c, t in ADAPTIVE)])
def test_scoring_is_bitwise_the_scoring_before(model, rule):
    from pipeline.eval.adaptive import score_tokens

    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, VOCAB, (3, 13), generator=g)
    targets = x[:, 1:].clone()
    targets[0, :4] = -100
    kw = dict(max_r=6, rule=rule, state_init="random", seed=4, sample_ids_B=torch.arange(3))
    with torch.no_grad():
        new = score_tokens(model, x[:, :-1], targets, **kw)
        old = baselines.score_tokens_before(model, x[:, :-1], targets, **kw)
    assert torch.equal(new.logprob, old.logprob)
    assert torch.equal(new.greedy, old.greedy) and torch.equal(new.depth, old.depth)
    if rule is not None:
        assert len(new.depth.unique()) > 1


@pytest.mark.parametrize(
    "kw",
    [
        dict(r=5),
        dict(r=12, kv_budget=4, continuous_cot=True),
        dict(r=8, exit_rule=ExitRule("kl", 0.03), kv_budget=3),
        dict(r=8, exit_rule=ExitRule("state", 0.3), continuous_cot=True),
    ],
    ids=["fixed", "budget-cot", "kl-budget", "state-cot"],
)
def test_static_shape_steps_give_the_same_tokens(model, kw):
    """The steps torch.compile and CUDA graphs run (position tensors, a key mask over the
    whole cache), here eager on CPU: the same tokens and depths as the dynamic-shape steps."""
    dynamic = generate(model, PROMPT, GenerationConfig(max_new_tokens=12, **kw))
    static = generate(model, PROMPT, GenerationConfig(max_new_tokens=12, static_shapes=True, **kw))
    assert static.decode_path == "static-shapes"
    assert static.new_ids == dynamic.new_ids and static.depths == dynamic.depths


@pytest.mark.slow
def test_compiled_decode_on_cpu_gives_the_same_tokens(model):
    cfg = dict(max_new_tokens=8, r=3)
    eager = generate(model, PROMPT, GenerationConfig(**cfg))
    compiled = generate(model, PROMPT, GenerationConfig(compile=True, **cfg))
    assert compiled.decode_path == "compiled"
    assert compiled.new_ids == eager.new_ids


def test_cuda_graph_settings_that_cannot_work_are_clear_errors(model):
    from pipeline.eval.decode import DecodeLoop

    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        generate(model, PROMPT, GenerationConfig(max_new_tokens=4, r=3, cuda_graph=True))
    adaptive = GenerationConfig(r=3, exit_rule=ExitRule("kl", 0.1))
    with pytest.raises(ValueError, match="fixed-r step"):
        DecodeLoop(model, adaptive, batch=1, capacity=8, device="cpu", cuda_graph=True)


@pytest.mark.gpu
def test_cuda_decode_replays_a_graph_and_gives_the_cpu_tokens(model):
    prompts_BP = torch.tensor([PROMPT, PROMPT[::-1]])
    want = generate_batch(model, prompts_BP, GenerationConfig(max_new_tokens=10, r=6)).new_ids
    model.cuda()
    try:
        got = generate_batch(model, prompts_BP, GenerationConfig(max_new_tokens=10, r=6))
        adaptive = generate(
            model, PROMPT, GenerationConfig(max_new_tokens=6, r=6, exit_rule=ExitRule("kl", 0.03))
        )
    finally:
        model.cpu()
    assert got.graph_replays == 9  # every step after the prefill
    assert got.decode_path == "cuda-graph"
    assert got.new_ids == want
    assert len(adaptive.new_ids) == 6  # adaptive exit runs the compiled steps, no graph


# ----------------------------------------------------------------- the fast one-position step
def _perturbed(**changes):
    """build_small_model with every parameter moved off its init (norm weights 1, qk_bias 0
    would hide a layout mistake in model/fast_decode.py's packing)."""
    from fixtures_model import build_small_model

    m = build_small_model(**changes)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * p.abs().mean().clamp_min(0.05) * torch.randn(p.shape, generator=g))
    return m


@pytest.mark.parametrize(
    "changes",
    [
        dict(),
        dict(layer_type="prenorm", qk_bias=False, tie_embeddings=False, scale_embedding=False),
    ],
    ids=["sandwich-qkbias-tied", "prenorm-untied"],
)
@pytest.mark.parametrize(
    "rope_mm,native,native_rows",
    [(True, False, 0), (False, False, 0), (True, True, 32), (True, True, 2)],
    ids=["rope-mm", "rope-addcmul", "native-kernels", "native-one-position-only"],
)
def test_fast_step_pieces_equal_the_layers_pieces(
    changes, rope_mm, native, native_rows, monkeypatch, c_compiler
):
    """FastDecodeStep's prelude / core iteration / coda for one or several new positions,
    against LeanForward's on the same cache contents: equal up to summation order (fp32
    rounding), and the same keys and values cached. One-position steps run in torch operations
    (RoPE both ways: an mm with the position's rotation matrix for small heads, else the
    elementwise form) and in the native C kernels (model/native_kernels.py), for every step
    or (few rows allowed) for the one-position steps only, torch for the others."""
    from pipeline.model import fast_decode
    from pipeline.model.fast_decode import FastDecodeStep

    if not rope_mm:
        monkeypatch.setattr(fast_decode, "ROPE_MM_MACS", 0)
    monkeypatch.setattr(fast_decode, "NATIVE_MAX_ROWS", native_rows)
    from pipeline.model.lean_forward import LeanForward
    from pipeline.model.rope_table import RopeTable
    from pipeline.model.static_cache import StaticKVCache

    model = _perturbed(**changes)
    lean = LeanForward(model)
    table = RopeTable.for_model(model, 16, torch.device("cpu"))
    caches = [
        StaticKVCache.for_model(model, batch=2, capacity=16, core_slots=2, device="cpu")
        for _ in range(2)
    ]
    fast = FastDecodeStep(model, caches[1], table, native=native)
    assert fast.rope_mm == rope_mm  # batch 2: the path under test
    assert (fast.kernels is not None) == native

    def lean_step(cache, chunk, offset):
        rope = table.slice(offset, chunk.shape[1])
        views = [cache.view("prelude"), cache.view("coda"), cache.view("core", 0)]
        views.append(cache.view("core", 1))
        for view in views:
            view.offset = offset
        e = lean.prelude(chunk, rope, views[0])
        s, buf, states = torch.randn(e.shape, generator=g), lean.adapter_input(e), []
        for i in range(3):
            s = lean.core(s, buf, rope, views[2 + i % 2])
            states.append(s)
        return e, states, lean.coda(s, rope, views[1])

    with torch.no_grad():
        # a 5-position prompt, single positions, a 3-position chunk (a speculative verification)
        for offset, length in ((0, 5), (5, 1), (6, 1), (7, 3), (10, 1)):
            chunk = torch.randint(
                0, VOCAB, (2, length), generator=torch.Generator().manual_seed(offset)
            )
            g = torch.Generator().manual_seed(offset)
            e_want, states_want, logits_want = lean_step(caches[0], chunk, offset)
            g = torch.Generator().manual_seed(offset)
            fast.set_position(offset, length)
            assert fast.native_now == (native and 2 * length <= native_rows)
            e = fast.prelude(chunk)
            s, buf = torch.randn(e.shape, generator=g), fast.adapter_input(e)
            torch.testing.assert_close(e, e_want, rtol=1e-5, atol=1e-5)
            for i in range(3):
                s = fast.core(s, buf, i % 2)
                torch.testing.assert_close(s, states_want[i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fast.coda(s), logits_want, rtol=1e-5, atol=1e-5)
        # both wrote the same keys and values for every position
        for name in ("prelude", "coda", "core"):
            torch.testing.assert_close(
                caches[1].view(name).kv_LBN2Ch, caches[0].view(name).kv_LBN2Ch
            )


def test_fast_step_runs_by_default_and_gives_the_layers_tokens(model, c_compiler):
    """The fast step (with the native kernels: a small model) is the default; its tokens equal
    the model's layers' with and without the kernels."""
    from pipeline.eval.decode import DecodeLoop

    loop = DecodeLoop(model, GenerationConfig(r=4), batch=1, capacity=8, device="cpu")
    assert loop.fast is not None  # an fp32 model at TP 1 on CPU
    assert loop.fast.kernels is not None  # small layers: the kernels at any thread count
    perturbed = _perturbed()
    prompts_BP = torch.tensor([PROMPT, PROMPT[::-1]])
    for kw in (dict(r=6), dict(r=8, kv_budget=3, continuous_cot=True)):
        layers = generate_batch(
            perturbed, prompts_BP, GenerationConfig(max_new_tokens=12, fast_path=False, **kw)
        )
        assert layers.decode_path == "layers"
        for native, path in ((True, "native-kernels"), (False, "fast-step")):
            cfg = GenerationConfig(max_new_tokens=12, fast_path=True, native_kernels=native, **kw)
            fast = generate_batch(perturbed, prompts_BP, cfg)
            assert (fast.decode_path, fast.new_ids) == (path, layers.new_ids)


def test_fast_path_settings_that_cannot_work_are_clear_errors(model):
    from pipeline.model.fast_decode import unsupported_reason

    with pytest.raises(ValueError, match="static-shape steps"):
        generate(model, PROMPT, GenerationConfig(r=2, static_shapes=True, fast_path=True))
    bf16 = _perturbed().to(torch.bfloat16)
    assert "torch.bfloat16" in unsupported_reason(bf16)
    with pytest.raises(ValueError, match="fp32 models"):
        generate(bf16, PROMPT, GenerationConfig(max_new_tokens=2, r=2, fast_path=True))
    with pytest.raises(ValueError, match="native_kernels: they run in the fast step, not for"):
        generate(bf16, PROMPT, GenerationConfig(max_new_tokens=2, r=2, native_kernels=True))
    with pytest.raises(ValueError, match="native_kernels: they run inside the fast step"):
        cfg = GenerationConfig(max_new_tokens=2, r=2, fast_path=False, native_kernels=True)
        generate(model, PROMPT, cfg)
