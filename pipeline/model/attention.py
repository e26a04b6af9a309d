"""Self-attention with Huginn's details and a pluggable core-attention backend.

`HuginnSelfAttention` (a megatron MegatronModule built from a ModuleSpec):
  x_SBH -> linear_qkv (ColumnParallelLinear, rows ordered [head, (q|k|v), head_dim] as in
  megatron, so a TP split is a split by heads) -> + qk_bias on q and k -> RoPE (interleaved
  pairs, fp32) -> core attention (causal, scale 1/sqrt(head_dim)) -> linear_proj
  (RowParallelLinear).

`CoreAttention` backends: `flash` (FlashAttention-3 from flash_attn_interface when importable,
else FlashAttention-2 from flash_attn; bf16/fp16 only), `sdpa` (torch SDPA; cuDNN first on
Hopper), `math` (plain matmul + fp32 softmax; CPU default). `resolve_backend` picks one from
device, dtype and head dim (see there); a failing FlashAttention import is logged with its
error once per process. All take [S, B, heads, head_dim] and keys
that may be longer than the queries (cached forward): queries are the LAST Sq positions, so
the causal mask is aligned bottom-right.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from pipeline.common.errors import RdptConfigError
from pipeline.model import compat

log = logging.getLogger("rdpt.model")

BACKENDS = ("auto", "flash", "sdpa", "math")
FLASH_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class FlashKernel:
    """An importable FlashAttention: `fa3` (flash_attn_interface, Hopper) or `fa2` (flash_attn)."""

    version: str
    func: Callable | None = None


def _import_flash() -> tuple[FlashKernel | None, dict[str, str]]:
    """FlashAttention-3 if importable, else FlashAttention-2, else None; with the import error
    of each one that failed (a broken install must not pass for an absent one)."""
    errors: dict[str, str] = {}
    try:
        from flash_attn_interface import flash_attn_func as fa3
    except Exception as e:  # noqa: BLE001 - any failure: recorded and logged with its error
        errors["flash_attn_interface"] = f"{type(e).__name__}: {e}"
    else:
        return FlashKernel("fa3", fa3), errors
    try:
        from flash_attn import flash_attn_func as fa2
    except Exception as e:  # noqa: BLE001
        errors["flash_attn"] = f"{type(e).__name__}: {e}"
        return None, errors
    return FlashKernel("fa2", fa2), errors


FLASH, FLASH_IMPORT_ERRORS = _import_flash()
_flash_attn_func = FLASH.func if FLASH is not None else None  # bench/tests: "is it there"
_import_logged = False


def log_flash_import() -> None:
    """Say once per process which FlashAttention is used, or why none (each import error)."""
    global _import_logged
    if _import_logged:
        return
    _import_logged = True
    if FLASH is not None:
        log.info("attention: FlashAttention %s importable", FLASH.version)
    for module, error in FLASH_IMPORT_ERRORS.items():
        # not installed is ordinary; anything else (a CUDA/ABI mismatch) is worth a warning
        level = logging.INFO if error.startswith("ModuleNotFoundError") else logging.WARNING
        log.log(level, "attention: import %s failed: %s", module, error)


def resolve_backend(
    name: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
    *,
    flash: FlashKernel | None | str = "detect",
    capability: tuple[int, int] | None = None,
) -> str:
    """The core-attention backend for tensors of `dtype` on `device` with heads of `head_dim`.

    auto: math on CPU; on CUDA, sdpa on sm90 and newer (cuDNN SDPA measured 413 TFLOP/s at
    head dim 128, sequence 4096 on an H100, FlashAttention-2 ~300-350 there), flash on older
    GPUs when a FlashAttention is importable and the dtype/head dim suit it, else sdpa.
    fp32 (and head dims flash does not take) never reach flash: an explicit `flash` then runs
    sdpa, with a warning. `flash` and `capability` describe the machine (default: this one),
    so the choice for another machine can be computed here."""
    if name not in BACKENDS:
        raise RdptConfigError(f"model.attention_backend: '{name}' is not one of {BACKENDS}")
    flash = FLASH if flash == "detect" else flash
    dev = torch.device(device) if device is not None else None
    on_cuda = torch.cuda.is_available() if dev is None else dev.type == "cuda"
    flash_fits = (dtype is None or dtype in FLASH_DTYPES) and (
        head_dim is None or (head_dim % 8 == 0 and head_dim <= 256)
    )
    if name == "auto":
        if not on_cuda:
            return "math"
        if capability is None:
            capability = (
                torch.cuda.get_device_capability(dev) if torch.cuda.is_available() else (0, 0)
            )
        prefers_sdpa = capability[0] >= 9  # measured, see the docstring
        if flash is not None and flash_fits and not prefers_sdpa:
            return "flash"
        return "sdpa"
    if name == "flash":
        if flash is None:
            raise RdptConfigError(
                "model.attention_backend: 'flash' needs FlashAttention (flash_attn_interface "
                f"or flash_attn; import errors: {FLASH_IMPORT_ERRORS}); use 'sdpa' or 'auto'"
            )
        if not flash_fits or not on_cuda:
            log.warning(
                "attention: flash does not take %s (head dim %s) on %s; using sdpa",
                dtype,
                head_dim,
                dev,
            )
            return "sdpa"
    return name


def _causal_mask(sq: int, sk: int, device) -> torch.Tensor:
    """Boolean [sq, sk], True = may attend; query i sits at key position sk - sq + i."""
    q_pos = torch.arange(sk - sq, sk, device=device)[:, None]
    k_pos = torch.arange(sk, device=device)[None, :]
    return k_pos <= q_pos


def _sdpa_context():
    """Prefer cuDNN attention on Hopper (fastest measured there), with fallbacks."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        return None
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        order.insert(0, SDPBackend.CUDNN_ATTENTION)
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without set_priority
        return sdpa_kernel(order)


class CoreAttention(MegatronModule):
    """softmax(q k^T / sqrt(d) + causal) v over [S, B, heads, head_dim] tensors.

    The backend is resolved when the module is built (the default device and the config's
    params_dtype), again whenever the module is moved or cast (`.to`, `.cuda`, `.bfloat16`:
    `_apply`), and in forward if the tensors arrive on another device or dtype than the one it
    was resolved for; `resolved_for` and `resolved` say what it is now."""

    def __init__(self, config, backend: str = "auto"):
        super().__init__(config=config)
        self.backend_name = backend
        self.head_dim = config.hidden_size // config.num_attention_heads
        log_flash_import()
        self._resolve(torch.empty(0).device, config.params_dtype)

    def _resolve(self, device: torch.device, dtype: torch.dtype) -> None:
        self.resolved_for = (device.type, dtype)
        self.resolved = resolve_backend(self.backend_name, device, dtype, self.head_dim)

    def _apply(self, fn, *args, **kwargs):
        # NOTE: a module without parameters learns where it went by moving a probe tensor.
        probe = fn(torch.empty(0, dtype=self.resolved_for[1], device=self.resolved_for[0]))
        self._resolve(probe.device, probe.dtype)
        return super()._apply(fn, *args, **kwargs)

    def backend(self, device: torch.device, dtype: torch.dtype) -> str:
        if (device.type, dtype) != self.resolved_for:
            self._resolve(device, dtype)
        return self.resolved

    def forward(self, q_SBNh, k_SBNh, v_SBNh, key_mask_K=None) -> torch.Tensor:
        """key_mask_K: None (causal, queries are the last positions) or a boolean mask that
        broadcasts to [B, heads, sq, sk]: [sk], the keys every query may see (a decode step
        over a fixed-size cache: static shapes), or [B, 1, sq, sk] (a left-padded batch)."""
        sq, sk = q_SBNh.shape[0], k_SBNh.shape[0]
        backend = self.backend(q_SBNh.device, q_SBNh.dtype)
        scale = 1.0 / math.sqrt(q_SBNh.shape[-1])
        if key_mask_K is not None:
            return self._masked(q_SBNh, k_SBNh, v_SBNh, key_mask_K, scale, backend)
        if backend == "flash":
            # flash_attn aligns the causal mask bottom-right when sq != sk (>= 2.1).
            q, k, v = (t.transpose(0, 1) for t in (q_SBNh, k_SBNh, v_SBNh))  # [B, S, N, h]
            o_BSNh = FLASH.func(q, k, v, causal=True, softmax_scale=scale)
            if isinstance(o_BSNh, tuple):  # some FA3 releases also return the log-sum-exp
                o_BSNh = o_BSNh[0]
            return o_BSNh.transpose(0, 1)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q_SBNh, k_SBNh, v_SBNh))  # [B, N, S, h]
        if backend == "sdpa":
            if sq == sk:
                kw = dict(is_causal=True)
            elif sq == 1:
                kw = dict(is_causal=False)
            else:
                kw = dict(attn_mask=_causal_mask(sq, sk, q.device))
            ctx = _sdpa_context() if q.is_cuda else None
            if ctx is None:
                o = F.scaled_dot_product_attention(q, k, v, scale=scale, **kw)
            else:
                with ctx:
                    o = F.scaled_dot_product_attention(q, k, v, scale=scale, **kw)
        else:  # math
            scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
            if sq > 1:  # one query (a decode step) sees every key: its mask is all True
                scores = scores.masked_fill(~_causal_mask(sq, sk, q.device), float("-inf"))
            o = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
        return o.permute(2, 0, 1, 3)  # [S, B, N, h]

    @staticmethod
    def _masked(q_SBNh, k_SBNh, v_SBNh, key_mask_K, scale, backend):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q_SBNh, k_SBNh, v_SBNh))  # [B, N, S, h]
        if backend == "math":
            scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
            scores = scores.masked_fill(~key_mask_K, float("-inf"))
            o = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
        else:  # flash_attn takes no mask: SDPA (same math)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask_K, scale=scale)
        return o.permute(2, 0, 1, 3)


@dataclass
class SelfAttentionSubmodules:
    linear_qkv: ModuleSpec | type
    core_attention: ModuleSpec | type
    linear_proj: ModuleSpec | type


class HuginnSelfAttention(MegatronModule):
    """Causal self-attention: fused head-major QKV, optional qk_bias before RoPE (fp32,
    interleaved pairs), no GQA, no linear biases."""

    def __init__(
        self,
        config,
        submodules: SelfAttentionSubmodules,
        *,
        qk_bias: bool,
        backend: str,
        output_init_method,
    ):
        super().__init__(config=config)
        from megatron.core.parallel_state import get_tensor_model_parallel_world_size
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        h = config.hidden_size
        tp = get_tensor_model_parallel_world_size()
        self.num_heads_local = config.num_attention_heads // tp
        self.head_dim = h // config.num_attention_heads
        self.linear_qkv = build_module(
            submodules.linear_qkv,
            h,
            3 * h,
            config=config,
            init_method=config.init_method,
            bias=False,
            gather_output=False,
        )
        self.core_attention = build_module(submodules.core_attention, config, backend=backend)
        self.linear_proj = build_module(
            submodules.linear_proj,
            h,
            h,
            config=config,
            init_method=output_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        if qk_bias:
            # Huginn layout [2 (q,k), 1, heads, head_dim]; TP splits the heads dim.
            self.qk_bias = torch.nn.Parameter(
                torch.zeros(2, 1, self.num_heads_local, self.head_dim, dtype=config.params_dtype)
            )
            set_tensor_model_parallel_attributes(self.qk_bias, is_parallel=True, dim=2, stride=1)
        else:
            self.qk_bias = None

    def forward(self, x_SBH, rope_SB1h, cache_view=None, layer_index: int = 0):
        """rope_SB1h: the RoPE angle table [S, 1, 1, head_dim] or a `rope_table.RopeSlice`
        (the same rotation, bitwise). cache_view: None, a `kv_cache.CacheView` or a
        `static_cache.StaticCacheView` (this layer's keys/values are cached under
        (block, slot, layer_index) and the attention sees all cached positions)."""
        S, B = x_SBH.shape[:2]
        qkv, _ = self.linear_qkv(x_SBH)
        qkv = qkv.view(S, B, self.num_heads_local, 3, self.head_dim)
        q, k, v = qkv.unbind(dim=3)
        if self.qk_bias is not None:
            q = q + self.qk_bias[0]
            k = k + self.qk_bias[1]
        if isinstance(rope_SB1h, torch.Tensor):
            q = compat.apply_rope(q, rope_SB1h, self.config)
            k = compat.apply_rope(k, rope_SB1h, self.config)
        else:  # a rope_table.RopeSlice: cos/sin computed once per token, not per layer call
            q, k = rope_SB1h.apply(q), rope_SB1h.apply(k)
        key_mask = None
        if cache_view is not None:
            k, v = cache_view.update(layer_index, k, v)
            key_mask = getattr(cache_view, "key_mask_K", None)  # static-shape decode steps
            if key_mask is None and hasattr(cache_view, "padding_mask"):
                key_mask = cache_view.padding_mask(S)  # a left-padded batch (Coconut training)
        o = (
            self.core_attention(q, k, v)
            if key_mask is None
            else self.core_attention(q, k, v, key_mask)
        )
        out, _ = self.linear_proj(o.reshape(S, B, -1))
        return out
