"""Tensor parallelism: TP=2 (2 processes, gloo) reproduces TP=1 in fp32 (logits, loss and
gradients), loads and writes the TP-unsharded checkpoint (resharding fused QKV and [gate|up]),
and the recurrence sampler draws the same r on both ranks. One distributed run for all."""

from __future__ import annotations

import torch
from test_model import batch, build, small_cfg
from test_model_reference import single_process_parallel

from pipeline.model.consolidated import full_state_dict, load_consolidated, write_consolidated
from pipeline.training.recurrence import RecurrenceConfig, sample_iterations
from tests.distributed import run_distributed

R, K = 4, 2


def run_model(model, ids, labels):
    with torch.no_grad():
        logits = model(ids, r=3, state_seed=5, sample_ids_B=[10, 11]).logits_BSV
    out = model(ids, labels, r=R, backprop_depth=K, state_seed=5, sample_ids_B=[10, 11])
    out.loss_BS.mean().backward()
    return logits, out.loss_BS.detach()


def _tp2_worker(rank, world_size, cases, ids, labels):
    from pipeline.model.consolidated import build_from_consolidated, save_consolidated
    from pipeline.model.runtime import destroy_model_parallel, init_model_parallel

    init_model_parallel(tp=2, seed=0)
    try:
        results = []
        for ckpt, out_dir in cases:
            model, cfg = build_from_consolidated(ckpt)
            qkv = model.core_block.layers[0].self_attention.linear_qkv.weight
            assert qkv.shape[0] == 3 * cfg.hidden_size // 2
            logits, loss = run_model(model, ids, labels)
            grads = full_state_dict(model, grads=True)
            save_consolidated(model, cfg, out_dir)  # gathers over TP, rank 0 writes
            results.append({"logits": logits, "loss": loss, "grads": grads if rank == 0 else None})
        draws = [sample_iterations(RecurrenceConfig(seed=99), s) for s in range(200)]
        return {"cases": results, "draws": draws}
    finally:
        destroy_model_parallel()


def test_tp2_reproduces_tp1_and_reshards_checkpoints(tmp_path):
    cfgs = {  # Huginn's sandwich with tied head, and a pre-norm variant with an untied head
        "sandwich": small_cfg(vocab_size=96, ffn_hidden_size=160),
        "prenorm": small_cfg(
            vocab_size=96, ffn_hidden_size=160, layer_type="prenorm", tie_embeddings=False
        ),
    }
    ids, labels = batch(cfgs["sandwich"])
    refs, cases = {}, []
    with single_process_parallel():
        for name, cfg in cfgs.items():
            model = build(cfg, seed=4)
            logits, loss = run_model(model, ids, labels)
            refs[name] = (logits, loss, full_state_dict(model, grads=True))
            write_consolidated(full_state_dict(model), cfg, tmp_path / f"{name}-tp1")
            cases.append((str(tmp_path / f"{name}-tp1"), str(tmp_path / f"{name}-tp2")))
    results = run_distributed(
        _tp2_worker, 2, args=(cases, ids, labels), env={"OMP_NUM_THREADS": "1"}
    )
    assert results[0]["draws"] == results[1]["draws"]
    for i, (name, cfg) in enumerate(cfgs.items()):
        ref_logits, ref_loss, ref_grads = refs[name]
        for res in results:
            torch.testing.assert_close(res["cases"][i]["logits"], ref_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(res["cases"][i]["loss"], ref_loss, atol=1e-5, rtol=1e-5)
        grads = results[0]["cases"][i]["grads"]
        assert set(grads) == set(ref_grads)
        for pname, g in ref_grads.items():
            torch.testing.assert_close(grads[pname], g, atol=1e-5, rtol=1e-4, msg=f"{name} {pname}")
        # TP=2 -> gathered checkpoint is bitwise the TP=1 one.
        _, sd1 = load_consolidated(tmp_path / f"{name}-tp1")
        cfg2, sd2 = load_consolidated(tmp_path / f"{name}-tp2")
        assert cfg2 == cfg and set(sd1) == set(sd2)
        for pname in sd1:
            assert torch.equal(sd1[pname], sd2[pname]), f"{name} {pname}"
