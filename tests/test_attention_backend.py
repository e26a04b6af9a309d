"""The core-attention backend: chosen from device, dtype and head dim when the model is built,
chosen again when the model moves or is cast, fp32 never on flash, FlashAttention-3 preferred
to FlashAttention-2, and a failing FlashAttention import logged with its error. The choice for
a CUDA machine is computed here from a description of it (capability, importable kernel)."""

from __future__ import annotations

import logging

import pytest
import torch
from test_model import build, small_cfg
from test_model_reference import tp1  # noqa: F401

from pipeline.model.attention import FlashKernel, resolve_backend

FA2, FA3 = FlashKernel("fa2"), FlashKernel("fa3")
A100, H100 = (8, 0), (9, 0)


@pytest.mark.parametrize(
    "name, device, dtype, head_dim, flash, capability, expected",
    [
        ("auto", "cpu", torch.float32, 64, FA2, None, "math"),
        ("auto", "cpu", torch.bfloat16, 64, FA2, None, "math"),
        ("auto", "cuda", torch.bfloat16, 128, FA2, A100, "flash"),
        ("auto", "cuda", torch.float32, 128, FA2, A100, "sdpa"),  # fp32 never on flash
        ("auto", "cuda", torch.bfloat16, 128, None, A100, "sdpa"),  # nothing importable
        ("auto", "cuda", torch.bfloat16, 320, FA2, A100, "sdpa"),  # head dim flash lacks
        ("auto", "cuda", torch.bfloat16, 128, FA2, H100, "sdpa"),  # cuDNN measured faster
        ("auto", "cuda", torch.bfloat16, 128, FA3, H100, "sdpa"),  # FA3 not yet measured
        ("flash", "cuda", torch.bfloat16, 128, FA3, H100, "flash"),
        ("flash", "cuda", torch.float32, 128, FA2, A100, "sdpa"),  # fp32 falls back, warned
        ("sdpa", "cuda", torch.float32, 128, FA2, A100, "sdpa"),
        ("math", "cuda", torch.bfloat16, 128, FA2, H100, "math"),
    ],
)
def test_backend_choice(name, device, dtype, head_dim, flash, capability, expected):
    got = resolve_backend(name, device, dtype, head_dim, flash=flash, capability=capability)
    assert got == expected


def test_explicit_flash_without_any_flashattention_is_a_config_error():
    from pipeline.common.errors import RdptConfigError

    with pytest.raises(RdptConfigError, match="needs FlashAttention"):
        resolve_backend("flash", "cuda", torch.bfloat16, 128, flash=None, capability=H100)


def test_fp32_falling_back_from_flash_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="rdpt.model"):
        resolve_backend("flash", "cuda", torch.float32, 128, flash=FA3, capability=H100)
    assert "flash does not take torch.float32" in caplog.text


def test_flashattention_3_is_preferred_when_both_import():
    import pipeline.model.attention as attention

    # the importer's order, not a stub: FA3 first, FA2 only when FA3 fails
    kernel, errors = attention._import_flash()
    if kernel is None:
        assert set(errors) == {"flash_attn_interface", "flash_attn"}
    elif kernel.version == "fa2":
        assert "flash_attn_interface" in errors
    else:
        assert kernel.version == "fa3" and not errors


def test_failing_flash_import_is_logged_with_its_error(caplog, monkeypatch):
    import pipeline.model.attention as attention

    monkeypatch.setattr(attention, "_import_logged", False)
    with caplog.at_level(logging.INFO, logger="rdpt.model"):
        attention.log_flash_import()
    for module, error in attention.FLASH_IMPORT_ERRORS.items():
        assert f"import {module} failed: {error}" in caplog.text
    if attention.FLASH is None:  # this machine: neither is installed
        assert "No module named 'flash_attn'" in caplog.text


def _core_attentions(model):
    from pipeline.model.attention import CoreAttention

    return [m for m in model.modules() if isinstance(m, CoreAttention)]


def test_backend_is_chosen_at_build_and_again_on_cast_and_move(tp1):
    cfg = small_cfg(attention_backend="auto")
    model = build(cfg, seed=0)
    cores = _core_attentions(model)
    assert len(cores) == cfg.n_prelude + cfg.n_core + cfg.n_coda
    assert all(c.resolved_for == ("cpu", torch.float32) and c.resolved == "math" for c in cores)
    model.to(torch.bfloat16)
    assert all(c.resolved_for == ("cpu", torch.bfloat16) for c in cores)
    model.to("meta")
    assert all(c.resolved_for == ("meta", torch.bfloat16) for c in cores)
    assert all(c.resolved == "math" for c in cores)  # not CUDA: math


def test_forward_on_other_tensors_resolves_again(tp1):
    cfg = small_cfg(attention_backend="sdpa")
    model = build(cfg, seed=0)
    (core, *_) = _core_attentions(model)
    q = torch.randn(8, 1, cfg.num_heads, cfg.head_dim, dtype=torch.bfloat16)
    core(q, q, q)
    assert core.resolved_for == ("cpu", torch.bfloat16) and core.resolved == "sdpa"


@pytest.mark.gpu
def test_model_built_on_cpu_gets_a_cuda_backend_after_moving(tp1):
    cfg = small_cfg(attention_backend="auto", hidden_size=256, num_heads=2)  # head dim 128
    model = build(cfg, seed=0)
    assert {c.resolved for c in _core_attentions(model)} == {"math"}
    model.cuda()
    assert {c.resolved for c in _core_attentions(model)} == {"sdpa"}  # fp32: never flash
    model.to(torch.bfloat16)
    expected = resolve_backend("auto", "cuda", torch.bfloat16, 128)
    assert {c.resolved for c in _core_attentions(model)} == {expected}
