"""Decoder layers built from megatron-core ModuleSpecs, stacked by megatron's TransformerBlock.

The layer kind (Huginn sandwich vs plain pre-norm), the core-attention backend and the TP
leaves (megatron's ColumnParallelLinear / RowParallelLinear, as ColumnLinear / RowLinear with
a compile-friendly forward at TP 1) are choices made in `layer_spec`, with direct class
references; the layer code is the same for every choice.

    sandwich:  x' = n2(x + Attn(n1(x))),   x'' = n4(x' + MLP(n3(x')))
    prenorm:   x' = x + Attn(n1(x)),       x'' = x' + MLP(n3(x'))

Precision: the layer keeps the dtype of its input x for the residual stream and the norms
(fp32 math, output in x's dtype); the linear layers cast their input to the weights' dtype.
A bf16 model fed an fp32 stream (the core, whose latent state is fp32) thus runs bf16 matmuls
with fp32 residual adds and norms, as autocast would with fp32 activations.

`DecoderLayer` follows megatron's TransformerLayer calling contract (keyword arguments
hidden_states, attention_mask, rotary_pos_emb, inference_context, ...; returns
(hidden_states, context)) so that a `megatron.core.transformer.transformer_block.TransformerBlock`
built from `block_spec` can stack it (recurrent.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from pipeline.model.attention import CoreAttention, HuginnSelfAttention, SelfAttentionSubmodules


class ColumnLinear(ColumnParallelLinear):
    """megatron's ColumnParallelLinear; at TP size 1 its forward is a plain F.linear (same
    math, same parameter layout) so torch.compile captures a whole layer without the graph
    breaks megatron's autograd function and process-group lookups cause."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from megatron.core.parallel_state import get_tensor_model_parallel_world_size

        self._plain = get_tensor_model_parallel_world_size() == 1

    def forward(self, input_, weight=None, *args, **kwargs):
        input_ = _to_compute_dtype(self, input_)
        if self._plain and weight is None:
            return _plain_linear(self, input_)
        return super().forward(input_, weight, *args, **kwargs)


class RowLinear(RowParallelLinear):
    """megatron's RowParallelLinear with a plain F.linear forward at TP size 1 (see
    ColumnLinear)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from megatron.core.parallel_state import get_tensor_model_parallel_world_size

        self._plain = get_tensor_model_parallel_world_size() == 1

    def forward(self, input_, *args, **kwargs):
        input_ = _to_compute_dtype(self, input_)
        if self._plain and not args and not kwargs:
            return _plain_linear(self, input_)
        return super().forward(input_, *args, **kwargs)


def _to_compute_dtype(layer, x):
    # The residual stream of the core may be fp32 (the latent state is carried in fp32, see
    # recurrent.py); matmuls run in the weights' dtype (bf16 under mixed precision).
    return x if x.dtype == layer.weight.dtype else x.to(layer.weight.dtype)


def _plain_linear(layer, x):
    bias = getattr(layer, "bias", None)
    if bias is not None and layer.skip_bias_add:
        return F.linear(x, layer.weight), bias
    return F.linear(x, layer.weight, bias), None


class RMSNorm(torch.nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w, computed in fp32, no bias, no (1 + w) offset; returned
    in the dtype of x (an fp32 residual stream stays fp32 in a bf16 model)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


@dataclass
class MLPSubmodules:
    linear_fc1: ModuleSpec | type
    linear_fc2: ModuleSpec | type


class SwiGLUMLP(MegatronModule):
    """proj(silu(a) * b) with [a | b] = fc(x): the first half is the gate. Under TP each rank
    holds [gate_r | up_r] (partition stride 2), so the split is local."""

    def __init__(self, config, submodules: MLPSubmodules, *, output_init_method):
        super().__init__(config=config)
        h, f = config.hidden_size, config.ffn_hidden_size
        self.linear_fc1 = build_module(
            submodules.linear_fc1,
            h,
            2 * f,
            config=config,
            init_method=config.init_method,
            bias=False,
            gather_output=False,
            stride=2,
        )
        self.linear_fc2 = build_module(
            submodules.linear_fc2,
            f,
            h,
            config=config,
            init_method=output_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, x_SBH):
        ab, _ = self.linear_fc1(x_SBH)
        a, b = ab.chunk(2, dim=-1)
        out, _ = self.linear_fc2(F.silu(a) * b)
        return out


@dataclass
class LayerSubmodules:
    norm_1: ModuleSpec | type
    self_attention: ModuleSpec | type
    norm_2: ModuleSpec | type | None
    norm_3: ModuleSpec | type
    mlp: ModuleSpec | type
    norm_4: ModuleSpec | type | None


class DecoderLayer(MegatronModule):
    """One decoder layer; with norm_2/norm_4 it is Huginn's sandwich block, without them a
    plain pre-norm layer.

    `layer_number` (1-based within its TransformerBlock), `pg_collection` and `vp_stage` are
    what TransformerBlock passes to every layer it builds; the layer number is the layer index
    of rdpt's KV cache key (block, slot, layer)."""

    def __init__(
        self,
        config,
        submodules: LayerSubmodules,
        *,
        eps: float,
        qk_bias: bool,
        backend: str,
        output_init_method,
        layer_number: int = 1,
        pg_collection=None,
        vp_stage=None,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        h, dt = config.hidden_size, config.params_dtype

        def norm(spec):
            return None if spec is None else build_module(spec, h, eps=eps, params_dtype=dt)

        self.norm_1 = norm(submodules.norm_1)
        self.self_attention = build_module(
            submodules.self_attention,
            config,
            qk_bias=qk_bias,
            backend=backend,
            output_init_method=output_init_method,
        )
        self.norm_2 = norm(submodules.norm_2)
        self.norm_3 = norm(submodules.norm_3)
        self.mlp = build_module(submodules.mlp, config, output_init_method=output_init_method)
        self.norm_4 = norm(submodules.norm_4)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        context=None,
        context_mask=None,
        rotary_pos_emb=None,
        inference_context=None,
        **unused,
    ):
        """megatron's TransformerLayer contract, as TransformerBlock calls it (all keywords).

        hidden_states [S, B, H]; rotary_pos_emb: the RoPE table [S, 1, 1, head_dim];
        inference_context: None (training) or rdpt's `kv_cache.CacheView` (which KV cache,
        block, core slot and position offset: see kv_cache.py). The attention is always causal,
        so attention_mask is None; context/context_mask (cross attention) and the other
        per-call arguments TransformerBlock forwards (rotary cos/sin, attention_bias,
        packed_seq_params, sequence_len_offset, padding_mask; the set differs between
        megatron-core versions, hence **unused) are None here. Returns (hidden_states, context).
        """
        x_SBH = hidden_states
        x = x_SBH + self.self_attention(
            self.norm_1(x_SBH), rotary_pos_emb, inference_context, self.layer_number - 1
        )
        if self.norm_2 is not None:
            x = self.norm_2(x)
        x = x + self.mlp(self.norm_3(x))
        if self.norm_4 is not None:
            x = self.norm_4(x)
        return x, context


def layer_spec(layer_type: str = "sandwich") -> ModuleSpec:
    """The ModuleSpec of one decoder layer: `sandwich` (Huginn) or `prenorm`."""
    attention = ModuleSpec(
        module=HuginnSelfAttention,
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnLinear,
            core_attention=CoreAttention,
            linear_proj=RowLinear,
        ),
    )
    mlp = ModuleSpec(
        module=SwiGLUMLP,
        submodules=MLPSubmodules(linear_fc1=ColumnLinear, linear_fc2=RowLinear),
    )
    sandwich = layer_type == "sandwich"
    return ModuleSpec(
        module=DecoderLayer,
        submodules=LayerSubmodules(
            norm_1=RMSNorm,
            self_attention=attention,
            norm_2=RMSNorm if sandwich else None,
            norm_3=RMSNorm,
            mlp=mlp,
            norm_4=RMSNorm if sandwich else None,
        ),
    )


def block_spec(
    layer_type: str, n_layers: int, *, eps: float, qk_bias: bool, backend: str, output_init_method
):
    """megatron's TransformerBlockSubmodules for a block of `n_layers` identical layers (the
    layer's own constructor arguments travel in the ModuleSpec's params)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    spec = dataclasses.replace(
        layer_spec(layer_type),
        params=dict(
            eps=eps, qk_bias=qk_bias, backend=backend, output_init_method=output_init_method
        ),
    )
    return TransformerBlockSubmodules(layer_specs=[spec] * n_layers)
