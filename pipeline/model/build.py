"""Build the recurrent-depth model from its ModelConfig (megatron-core modules, CPU-safe).

init_model_parallel(tp=1)                 # pipeline.model.runtime
model = build_model(cfg)                  # RecurrentDepthLM, parameters initialised
"""

from __future__ import annotations

from pipeline.model.config import ModelConfig


def megatron_config(cfg: ModelConfig, params_dtype=None):
    """The megatron TransformerConfig for `cfg` (CPU-safe: fusions off, CPU initialisation)."""
    import torch

    from pipeline.model import compat
    from pipeline.model.init import normal_init

    params_dtype = params_dtype or torch.float32
    return compat.transformer_config(
        num_layers=max(cfg.n_layers_total, 1),
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        rotary_interleaved=True,
        init_method_std=cfg.resolved_init_std,
        init_method=normal_init(cfg.resolved_init_std),
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
    )


def build_model(cfg: ModelConfig, *, params_dtype=None):
    """Build a RecurrentDepthLM for the current megatron parallel_state (initialise it first
    with `pipeline.model.runtime.init_model_parallel(tp)`). Parameters are created and initialised
    in the module constructors (CPU init; under `torch.device("meta")` nothing is allocated)."""
    import torch
    from megatron.core import parallel_state

    from pipeline.common.errors import RdptConfigError
    from pipeline.model.recurrent import RecurrentDepthLM

    if not parallel_state.model_parallel_is_initialized():
        raise RdptConfigError(
            "build_model: megatron parallel_state is not initialised; call "
            "pipeline.model.runtime.init_model_parallel(tp) first"
        )
    cfg.check(tp=parallel_state.get_tensor_model_parallel_world_size())
    return RecurrentDepthLM(cfg, megatron_config(cfg, params_dtype or torch.float32))
