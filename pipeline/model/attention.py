"""Self-attention with Huginn's details and a pluggable core-attention backend.

`HuginnSelfAttention` (a megatron MegatronModule built from a ModuleSpec):
  x_SBH -> linear_qkv (ColumnParallelLinear, rows ordered [head, (q|k|v), head_dim] as in
  megatron, so a TP split is a split by heads) -> + qk_bias on q and k -> RoPE (interleaved
  pairs, fp32) -> core attention (causal, scale 1/sqrt(head_dim)) -> linear_proj
  (RowParallelLinear).

`CoreAttention` backends: `flash` (flash_attn), `sdpa` (torch SDPA; cuDNN first on Hopper),
`math` (plain matmul + fp32 softmax; CPU default). All take [S, B, heads, head_dim] and keys
that may be longer than the queries (cached forward): queries are the LAST Sq positions, so
the causal mask is aligned bottom-right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from pipeline.common.errors import RdptConfigError
from pipeline.model import compat

try:  # optional extra `rdpt[flash]`
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None

BACKENDS = ("auto", "flash", "sdpa", "math")


def resolve_backend(name: str, device: torch.device | str | None = None) -> str:
    """`auto` -> flash (CUDA + flash_attn importable) > sdpa (CUDA) > math (CPU)."""
    if name not in BACKENDS:
        raise RdptConfigError(f"model.attention_backend: '{name}' is not one of {BACKENDS}")
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if name == "auto":
        if on_cuda and _flash_attn_func is not None:
            return "flash"
        return "sdpa" if on_cuda else "math"
    if name == "flash" and _flash_attn_func is None:
        raise RdptConfigError(
            "model.attention_backend: 'flash' needs the flash_attn package (pip install "
            "'rdpt[flash]'); use 'sdpa' or 'auto'"
        )
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
    """softmax(q k^T / sqrt(d) + causal) v over [S, B, heads, head_dim] tensors."""

    def __init__(self, config, backend: str = "auto"):
        super().__init__(config=config)
        self.backend_name = backend
        self._resolved: str | None = None

    def backend(self, device: torch.device) -> str:
        if self._resolved is None:
            self._resolved = resolve_backend(self.backend_name, device)
        return self._resolved

    def forward(self, q_SBNh, k_SBNh, v_SBNh, key_mask_K=None) -> torch.Tensor:
        """key_mask_K: None (causal, queries are the last positions) or a boolean [sk]: the
        keys every query may see (a decode step over a fixed-size cache: static shapes)."""
        sq, sk = q_SBNh.shape[0], k_SBNh.shape[0]
        backend = self.backend(q_SBNh.device)
        scale = 1.0 / math.sqrt(q_SBNh.shape[-1])
        if key_mask_K is not None:
            return self._masked(q_SBNh, k_SBNh, v_SBNh, key_mask_K, scale, backend)
        if backend == "flash":
            # flash_attn aligns the causal mask bottom-right when sq != sk (>= 2.1).
            q, k, v = (t.transpose(0, 1) for t in (q_SBNh, k_SBNh, v_SBNh))  # [B, S, N, h]
            o_BSNh = _flash_attn_func(q, k, v, causal=True, softmax_scale=scale)
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
        o = (
            self.core_attention(q, k, v)
            if key_mask is None
            else self.core_attention(q, k, v, key_mask)
        )
        out, _ = self.linear_proj(o.reshape(S, B, -1))
        return out
