"""The chunked loss (model.loss_chunk_tokens) equals the unfused loss: per-token losses and
every parameter gradient within 1e-6 in fp32, at TP 1 and TP 2 (vocab-parallel logits), with
even and uneven slices and ignored labels."""

from __future__ import annotations

import pytest
from test_model import batch, build, small_cfg
from test_model_reference import tp1  # noqa: F401

from distributed import run_distributed

CHUNKS = (6, 10, 1)  # tokens per slice at B=2, S=12: 4 slices of 3 rows; 5+5+2 rows; 12 x 1


def _losses_and_grads(model, ids, labels, chunk_tokens: int):
    model.cfg.loss_chunk_tokens = chunk_tokens
    model.zero_grad(set_to_none=True)
    out = model(ids, labels, r=3, backprop_depth=2, state_seed=5, sample_ids_B=[0, 1])
    out.loss_BS.mean().backward()  # as the training step reduces it
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out.loss_BS.detach().clone(), grads


def _compare_all(model, ids, labels) -> list[tuple[int, float, float]]:
    """(chunk, max loss difference, max gradient difference) against unfused, per chunk."""
    ref_loss, ref_grads = _losses_and_grads(model, ids, labels, 0)
    out = []
    for chunk in CHUNKS:
        loss, grads = _losses_and_grads(model, ids, labels, chunk)
        assert set(grads) == set(ref_grads)
        grad_diff = max((grads[n] - g).abs().max().item() for n, g in ref_grads.items())
        out.append((chunk, (loss - ref_loss).abs().max().item(), grad_diff))
    assert ref_loss[0, 3] == 0 and ref_loss[1, 7] == 0  # ignored positions
    return out


def _labels_with_ignored(cfg):
    ids, labels = batch(cfg)
    labels[0, 3] = -1
    labels[1, 7] = -100
    return ids, labels


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_equals_unfused_at_tp1(tp1, tied):
    cfg = small_cfg(tie_embeddings=tied)
    model = build(cfg, seed=3)
    ids, labels = _labels_with_ignored(cfg)
    for chunk, loss_diff, grad_diff in _compare_all(model, ids, labels):
        assert loss_diff <= 1e-6, (chunk, loss_diff)
        assert grad_diff <= 1e-6, (chunk, grad_diff)


def _tp2(rank, world):
    from pipeline.model.runtime import destroy_model_parallel, init_model_parallel

    init_model_parallel(tp=2, seed=0)
    try:
        results = []
        for tied in (True, False):
            cfg = small_cfg(tie_embeddings=tied)
            model = build(cfg, seed=3)
            assert model.embedding.weight.shape[0] == cfg.vocab_size // 2  # vocab-parallel
            ids, labels = _labels_with_ignored(cfg)
            results.append(_compare_all(model, ids, labels))
        return results
    finally:
        destroy_model_parallel()


def test_chunked_loss_equals_unfused_at_tp2():
    for rank_results in run_distributed(_tp2, 2, env={"OMP_NUM_THREADS": "1"}):
        for per_chunk in rank_results:
            for chunk, loss_diff, grad_diff in per_chunk:
                assert loss_diff <= 1e-6, (chunk, loss_diff)
                assert grad_diff <= 1e-6, (chunk, grad_diff)


def test_chunked_loss_is_on_by_default_and_keeps_no_full_logits(tp1):
    from pipeline.model.config import ModelConfig

    assert ModelConfig().loss_chunk_tokens > 0
    cfg = small_cfg(vocab_size=96)
    model = build(cfg, seed=3)
    ids, labels = batch(cfg)
    widest = {}

    def record(chunk):
        model.cfg.loss_chunk_tokens = chunk
        sizes = []
        head = model._logits_parallel

        def spy(x):
            out = head(x)
            sizes.append(out.shape[0] * out.shape[1])  # tokens whose logits exist at once
            return out

        model._logits_parallel = spy
        try:
            model(ids, labels, r=2, backprop_depth=1).loss_BS.sum().backward()
        finally:
            del model._logits_parallel
        widest[chunk] = max(sizes)

    record(0)
    record(6)
    assert widest[0] == 24 and widest[6] == 6  # B x S = 24 tokens; slices of 6 in fwd and bwd
