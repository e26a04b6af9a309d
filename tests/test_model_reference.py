"""An independent plain-PyTorch Huginn forward pass, written from the published architecture
(its details are listed in pipeline/model/recurrent.py's docstring) and
working directly on Hugging Face layout tensors (`transformer.wte.weight`, ...). The rdpt model
(megatron-core modules, its own QKV layout, megatron RoPE) is compared against it in
test_model.py and test_convert.py. Kept small and readable on purpose: no TP, no cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def rope_interleaved(x_BSNh, base):
    """Rotate pairs (2i, 2i+1) by angle pos * base^(-2i/hd): complex multiplication in fp32."""
    B, S, N, hd = x_BSNh.shape
    inv = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.outer(torch.arange(S, dtype=torch.float32), inv)  # [S, hd/2]
    cis = torch.polar(torch.ones_like(ang), ang)[None, :, None, :]
    xc = torch.view_as_complex(x_BSNh.float().reshape(B, S, N, hd // 2, 2).contiguous())
    return torch.view_as_real(xc * cis).reshape(B, S, N, hd).to(x_BSNh.dtype)


def attention(x, sd, pre, hf_cfg):
    B, S, H = x.shape
    nh = hf_cfg["n_heads"]
    hd = H // nh
    qkv = x @ sd[f"{pre}.attn.Wqkv.weight"].T
    q, k, v = qkv.view(B, S, 3 * nh, hd).chunk(3, dim=2)  # [Q | K | V], each head-major
    if f"{pre}.attn.qk_bias" in sd:
        qb, kb = sd[f"{pre}.attn.qk_bias"].split(1, dim=0)  # [1, 1, nh, hd] each
        q, k = q + qb, k + kb  # NOTE: bias before RoPE
    q = rope_interleaved(q, hf_cfg["rope_base"])
    k = rope_interleaved(k, hf_cfg["rope_base"])
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, nh, S, hd]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    y = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
    return y.transpose(1, 2).reshape(B, S, H) @ sd[f"{pre}.attn.proj.weight"].T


def mlp(x, sd, pre):
    gate, up = (x @ sd[f"{pre}.mlp.fc.weight"].T).chunk(2, dim=-1)  # first half is the gate
    return (F.silu(gate) * up) @ sd[f"{pre}.mlp.proj.weight"].T


def sandwich_block(x, sd, pre, hf_cfg):
    eps = hf_cfg["norm_eps"]
    x = rms_norm(
        x + attention(rms_norm(x, sd[f"{pre}.norm_1.weight"], eps), sd, pre, hf_cfg),
        sd[f"{pre}.norm_2.weight"],
        eps,
    )
    x = rms_norm(
        x + mlp(rms_norm(x, sd[f"{pre}.norm_3.weight"], eps), sd, pre),
        sd[f"{pre}.norm_4.weight"],
        eps,
    )
    return x


def huginn_forward(sd, hf_cfg, ids_BS, num_steps, s0_BSH, backprop_depth=None):
    """Logits [B, S, V]. Truncated backprop built by hand: the state is detached before the
    last `backprop_depth` iterations, so no gradient reaches earlier iterations."""
    h = hf_cfg["n_embd"]
    x = sd["transformer.wte.weight"][ids_BS] * math.sqrt(h)
    for i in range(hf_cfg["n_layers_in_prelude"]):
        x = sandwich_block(x, sd, f"transformer.prelude.{i}", hf_cfg)
    e = x
    s = s0_BSH
    first_graded = 0 if backprop_depth is None else max(num_steps - backprop_depth, 0)
    for it in range(num_steps):
        if it == first_graded:
            s = s.detach()
        s = torch.cat([s, e], dim=-1) @ sd["transformer.adapter.weight"].T  # state first
        for i in range(hf_cfg["n_layers_in_recurrent_block"]):
            s = sandwich_block(s, sd, f"transformer.core_block.{i}", hf_cfg)
    eps = hf_cfg["norm_eps"]
    x = rms_norm(s, sd["transformer.ln_f.weight"], eps)
    for i in range(hf_cfg["n_layers_in_coda"]):
        x = sandwich_block(x, sd, f"transformer.coda.{i}", hf_cfg)
    x = rms_norm(x, sd["transformer.ln_f.weight"], eps)  # the same ln_f again
    return x @ sd["lm_head.weight"].T


def random_hf_state_dict(hf_cfg, seed=0):
    """Random Huginn-layout tensors (tied head) for a small config."""
    g = torch.Generator().manual_seed(seed)
    h, f = hf_cfg["n_embd"], hf_cfg["intermediate_size"]
    V, nh = hf_cfg["vocab_size"], hf_cfg["n_heads"]

    def rnd(*shape, std):
        return torch.randn(*shape, generator=g) * std

    sd = {"transformer.wte.weight": rnd(V, h, std=0.05)}
    for block, n in (
        ("prelude", hf_cfg["n_layers_in_prelude"]),
        ("core_block", hf_cfg["n_layers_in_recurrent_block"]),
        ("coda", hf_cfg["n_layers_in_coda"]),
    ):
        for i in range(n):
            p = f"transformer.{block}.{i}"
            for j in range(1, 5):
                sd[f"{p}.norm_{j}.weight"] = 1.0 + rnd(h, std=0.1)
            sd[f"{p}.attn.Wqkv.weight"] = rnd(3 * h, h, std=h**-0.5)
            sd[f"{p}.attn.qk_bias"] = rnd(2, 1, nh, h // nh, std=0.1)
            sd[f"{p}.attn.proj.weight"] = rnd(h, h, std=h**-0.5)
            sd[f"{p}.mlp.fc.weight"] = rnd(2 * f, h, std=h**-0.5)
            sd[f"{p}.mlp.proj.weight"] = rnd(h, f, std=f**-0.5)
    sd["transformer.adapter.weight"] = rnd(h, 2 * h, std=(2 * h) ** -0.5)
    sd["transformer.ln_f.weight"] = 1.0 + rnd(h, std=0.1)
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
    return sd


def test_reference_rope_rotates_interleaved_pairs():
    # A vector (1, 0) in pair i at position p must become (cos, sin) of p * base^(-2i/hd).
    hd, base = 8, 100.0
    x = torch.zeros(1, 3, 1, hd)
    x[..., 0::2] = 1.0
    out = rope_interleaved(x, base)
    inv = 1.0 / (base ** (torch.arange(0, hd, 2).float() / hd))
    for pos in range(3):
        assert torch.allclose(out[0, pos, 0, 0::2], torch.cos(pos * inv), atol=1e-6)
        assert torch.allclose(out[0, pos, 0, 1::2], torch.sin(pos * inv), atol=1e-6)


# ---------------------------------------------------------------------- shared test helpers
import contextlib  # noqa: E402

import pytest  # noqa: E402


@contextlib.contextmanager
def single_process_parallel(tp_seed: int = 0):
    """A world-size-1 gloo group (in-memory store, no env vars) + megatron parallel_state."""
    import torch.distributed as dist

    from pipeline.model.runtime import destroy_model_parallel, init_model_parallel

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    init_model_parallel(tp=1, seed=tp_seed)
    try:
        yield
    finally:
        destroy_model_parallel()
        if created:
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp1():
    with single_process_parallel():
        yield


def small_hf_config(**kw):
    cfg = {
        "n_embd": 64,
        "n_heads": 4,
        "intermediate_size": 160,
        "vocab_size": 96,
        "n_layers_in_prelude": 1,
        "n_layers_in_recurrent_block": 2,
        "n_layers_in_coda": 1,
        "norm_eps": 1e-6,
        "rope_base": 50000.0,
        "qk_bias": True,
        "tie_embeddings": True,
        "block_size": 64,
    }
    cfg.update(kw)
    return cfg
