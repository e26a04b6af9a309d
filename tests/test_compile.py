"""torch.compile in training (train.compile, applied by parallel.py::compile_model): on CPU
with inductor, r in {1, 3, 7} with graded and gradient-free iterations through prelude, core
and coda recompile nothing after warm-up (Dynamo's own counters), and the compiled model's
loss and gradients equal eager ones within fp32 tolerance."""

from __future__ import annotations

import pytest
import torch
from test_model import batch, build, small_cfg
from test_model_reference import tp1  # noqa: F401

from distributed import run_distributed


def _train_step(model, ids, labels, r, k):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels, r=r, backprop_depth=k, state_seed=1, sample_ids_B=[0, 1])
    out.loss_BS.mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out.loss_BS.detach(), grads


def _eval_forward(model, ids, labels, r):
    with torch.no_grad():  # what validation does during training
        return model(ids, labels, r=r, backprop_depth=1, state_seed=1).loss_BS


def _dynamo_state():
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": counters["stats"]["unique_graphs"],
        "frames_ok": counters["frames"]["ok"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


@pytest.mark.slow
def test_compiled_training_recompiles_nothing_after_warmup_and_equals_eager(tp1):
    from torch._dynamo.utils import counters

    from pipeline.training.parallel import compile_model

    torch._dynamo.reset()
    counters.clear()
    cfg = small_cfg()
    eager, compiled = build(cfg, seed=0), build(cfg, seed=0)
    compile_model(compiled)
    ids, labels = batch(cfg)
    # warm-up: one training step with both kinds of iterations, one validation forward
    _train_step(compiled, ids, labels, r=3, k=2)
    _eval_forward(compiled, ids, labels, r=2)
    warm = _dynamo_state()
    assert warm["unique_graphs"] >= 3  # prelude, core iteration, coda were all compiled

    for r in (1, 3, 7):
        loss_c, grads_c = _train_step(compiled, ids, labels, r=r, k=2)
        loss_e, grads_e = _train_step(eager, ids, labels, r=r, k=2)
        torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
        for name, g in grads_e.items():
            torch.testing.assert_close(grads_c[name], g, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(
            _eval_forward(compiled, ids, labels, r), _eval_forward(eager, ids, labels, r)
        )
    assert _dynamo_state() == warm  # nothing compiled again after warm-up


def test_compile_setting():
    from pipeline.training.config import load_train_config
    from pipeline.training.parallel import compile_enabled

    def cfg(*o):
        return load_train_config(None, list(o))

    assert compile_enabled(cfg(), cuda=True) is True
    assert compile_enabled(cfg(), cuda=False) is False
    assert compile_enabled(cfg("parallel.zero_stage=3"), cuda=True) is False
    assert compile_enabled(cfg("train.compile=on"), cuda=False) is True
    assert compile_enabled(cfg("train.compile=off"), cuda=True) is False


def _engine_regions(rank, world):
    from pipeline.model import build_model
    from pipeline.model.runtime import destroy_model_parallel
    from pipeline.training.config import load_train_config
    from pipeline.training.layout import ParallelDims
    from pipeline.training.parallel import parallelize

    cfg = load_train_config(
        None,
        [
            "model.vocab_size=96",
            "model.hidden_size=64",
            "model.num_heads=4",
            "model.ffn_hidden_size=160",
            "model.n_prelude=1",
            "model.n_core=1",
            "model.n_coda=1",
            "train.compile=on",
            "train.global_batch_size=2",
            "train.micro_batch_size=2",
        ],
    )
    engine = parallelize(
        lambda dt: build_model(cfg.model, params_dtype=dt), ParallelDims.from_config(cfg, 1), cfg
    )
    try:
        m = engine.module
        return {
            "iteration": hasattr(m.iteration, "_torchdynamo_orig_callable"),
            "prelude": m.prelude_block._compiled_call_impl is not None,
            "coda": m.coda_block._compiled_call_impl is not None,
            "names": sorted(n for n, _ in m.named_parameters())[:3],
        }
    finally:
        destroy_model_parallel()


def test_parallelize_compiles_the_regions_without_renaming_parameters():
    (res,) = run_distributed(_engine_regions, world_size=1)
    assert res["iteration"] and res["prelude"] and res["coda"]
    assert not any("_orig_mod" in n for n in res["names"])
