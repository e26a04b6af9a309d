"""rdpt's C decode kernels (pipeline/model/native_kernels.py, native/decode_kernels.c): each
against torch's own computation of the same thing, for the shapes a decode meets and the
awkward ones (rows not in blocks of 8, columns not in panels of 32, head sizes not in vectors
of 16); the build (cached, written under a temporary name) and what happens without it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import native_kernels


@pytest.fixture(scope="module")
def kernels(c_compiler):
    nk = native_kernels.load()
    assert nk is not None, native_kernels.unavailable_reason()  # CI has a C compiler
    return nk


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 11])
@pytest.mark.parametrize("K,N", [(128, 1024), (7, 5), (33, 70), (16, 130)])
def test_gemm_equals_torch_with_residual_and_bias(kernels, M, K, N):
    g = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    x_wide = torch.randn(M, K + 3, generator=g)
    x = x_wide[:, 1 : K + 1]  # rows with a stride: a narrowed view, as the decode passes
    w = torch.randn(K, N, generator=g)
    add, bias = torch.randn(M, N, generator=g), torch.randn(N, generator=g)
    packed = kernels.pack(w)
    assert packed.panels.numel() == math.ceil(N / 32) * 32 * K
    _close(kernels.gemm(x, packed, torch.empty(M, N)), x @ w)
    _close(kernels.gemm(x, packed, torch.empty(M, N), add_MN=add, bias_N=bias), add + bias + x @ w)
    in_place = add.clone()
    kernels.gemm(x, packed, in_place, add_MN=in_place)  # out = add: the residual update
    _close(in_place, add + x @ w)


def test_gemm_rejects_mismatched_shapes(kernels):
    packed = kernels.pack(torch.randn(8, 32))
    with pytest.raises(ValueError, match=r"gemm: x \(2, 7\) @ w \[8, 32\]"):
        kernels.gemm(torch.randn(2, 7), packed, torch.empty(2, 32))
    with pytest.raises(ValueError, match="float32 CPU tensors"):
        kernels.pack(torch.randn(8, 32, dtype=torch.float64))


@pytest.mark.parametrize("hd", [32, 6])  # vector path, scalar path
@pytest.mark.parametrize("length", [1, 9])
def test_attend_one_equals_sdpa_over_the_cache_prefix(kernels, hd, length):
    g = torch.Generator().manual_seed(hd + length)
    B, N, capacity = 3, 2, 12
    kv = torch.randn(B, N, 2, capacity, hd, generator=g)  # the static cache's layout
    qkv = torch.randn(B, N, 3, hd, generator=g)
    scores, out = torch.empty(capacity), torch.empty(B, N * hd)
    k, v = kv[:, :, 0], kv[:, :, 1]
    kernels.attend_one(qkv.select(2, 0), k, v, length, scores, out, 1 / math.sqrt(hd))
    want = F.scaled_dot_product_attention(
        qkv[:, :, :1], k.narrow(2, 0, length), v.narrow(2, 0, length)
    )
    _close(out, want.reshape(B, N * hd))


@pytest.mark.parametrize("H", [128, 20])
def test_rms_norm_equals_the_models_norm(kernels, H):
    from pipeline.model.layers import RMSNorm

    norm = RMSNorm(H, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(H) + 0.5)
    x = torch.randn(5, H) * 3
    with torch.no_grad():
        _close(kernels.rms_norm(x, norm.weight, 1e-5, torch.empty(5, H)), norm(x))


def test_build_is_cached_and_leaves_no_temporary_files(c_compiler, tmp_path, monkeypatch):
    monkeypatch.setenv("RDPT_CACHE_DIR", str(tmp_path))
    nk = native_kernels.load()
    assert nk is not None, native_kernels.unavailable_reason()
    built = sorted(p.name for p in (tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].startswith("decode_kernels-") and built[0].endswith(".so")
    assert native_kernels.load() is nk  # once per process and setting
    mtime = (tmp_path / "kernels" / built[0]).stat().st_mtime_ns
    assert native_kernels._build(native_kernels._compiler()).stat().st_mtime_ns == mtime


def test_unavailable_kernels_say_why_and_the_decode_runs_without_them(
    c_compiler, small_eval_model, tmp_path, monkeypatch
):
    from pipeline.eval.generate import GenerationConfig, generate

    prompt = [3, 14, 15, 9]
    want = generate(small_eval_model, prompt, GenerationConfig(max_new_tokens=6, r=3))
    assert want.decode_path == "native-kernels"
    monkeypatch.setenv("RDPT_NATIVE_KERNELS", "0")
    assert native_kernels.load() is None
    assert native_kernels.unavailable_reason() == "RDPT_NATIVE_KERNELS=0"
    got = generate(small_eval_model, prompt, GenerationConfig(max_new_tokens=6, r=3))
    assert got.decode_path == "fast-step"  # the fast step in torch operations
    assert got.new_ids == want.new_ids
    with pytest.raises(ValueError, match="native_kernels: unavailable .RDPT_NATIVE_KERNELS=0"):
        generate(small_eval_model, prompt, GenerationConfig(r=3, native_kernels=True))
    monkeypatch.setenv("RDPT_NATIVE_KERNELS", "1")
    monkeypatch.setenv("RDPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native_kernels.load() is None
    assert "build or load failed" in native_kernels.unavailable_reason()
    assert "no-such-cc" in native_kernels.unavailable_reason()
    assert not any((tmp_path / "kernels").iterdir())  # nothing half-written left behind


def test_bound_layer_checks_what_it_is_bound_to_and_each_call(kernels):
    """What stays fixed for a decode (cache layout, RoPE tables) is checked when a layer is
    bound; each call checks its rows, position range, output and scratch: a wrong call raises
    instead of writing outside the buffers."""
    from pipeline.model.native_kernels import NativeKernels, NativeLayer

    heads, hd, F_, B, capacity = 2, 16, 48, 3, 10
    H = heads * hd
    g = torch.Generator().manual_seed(0)
    layer = NativeLayer(
        kernels, w_qkv=torch.randn(H, 3 * H, generator=g), w_proj=torch.randn(H, H, generator=g),
        w_fc1=torch.randn(H, 2 * F_, generator=g), w_fc2=torch.randn(F_, H, generator=g),
        b_qkv=None, norms=[torch.ones(H), None, torch.ones(H), None], heads=heads, hd=hd, eps=1e-6,
    )  # fmt: skip
    kv = torch.zeros(B, heads, 2, capacity, hd)
    cos, sin = torch.ones(capacity, hd), torch.zeros(capacity, hd)
    with pytest.raises(ValueError, match="RoPE tables"):
        kernels.bind_layer(layer, kv, cos[:4], sin[:4], 0.25)  # fewer rows than positions
    with pytest.raises(ValueError, match="a cache"):
        kernels.bind_layer(layer, kv[:, :1], cos, sin, 0.25)  # one head for a two-head layer
    bound = kernels.bind_layer(layer, kv, cos, sin, 0.25)
    scratch = torch.empty(NativeKernels.layer_scratch_floats(2 * B, H, F_, capacity))
    x = torch.randn(2 * B, H, generator=g)
    out = bound(x, torch.empty_like(x), 3, 2, scratch)  # positions 3 and 4
    assert torch.isfinite(out).all() and kv[:, :, :, 3:5].abs().sum() > 0
    assert kv[:, :, :, 5:].abs().sum() == 0 and kv[:, :, :, :3].abs().sum() == 0
    with pytest.raises(ValueError, match="positions 9..10 of a cache"):
        bound(x, torch.empty_like(x), 9, 2, scratch)
    with pytest.raises(ValueError, match="6 rows at positions"):
        bound(x, torch.empty_like(x), 3, 1, scratch)  # 6 rows are 2 positions of 3 sequences
    with pytest.raises(ValueError, match="floats of scratch"):
        bound(x, torch.empty_like(x), 3, 2, scratch[:10])
    with pytest.raises(ValueError, match="float32"):
        bound(x.double(), torch.empty_like(x), 3, 2, scratch)
