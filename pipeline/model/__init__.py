"""The recurrent-depth language model (Huginn architecture) on megatron-core (layer 2: imports
only the shared basics; no DeepSpeed, no training code).

    from pipeline.model import ModelConfig, build_model
    from pipeline.model.runtime import init_model_parallel
    init_model_parallel(tp=1)
    model = build_model(cfg)                 # RecurrentDepthLM
    out = model(ids_BS, labels_BS, r=32, backprop_depth=8)

  config.py        ModelConfig: shape and architectural switches (presets in configs/model/)
  build.py         ModelConfig -> megatron TransformerConfig -> RecurrentDepthLM
  recurrent.py     prelude -> core looped r times on a latent state -> coda -> tied head
  layers.py        the decoder layer (Huginn sandwich or pre-norm), chosen by module spec
  attention.py     core attention backends (FlashAttention 3/2, torch SDPA, math), chosen
                   from device, dtype and head dim
  loss.py          the training loss over token slices (no full fp32 logits)
  depth.py         r iterations -> (no-grad, graded) under truncated backprop
  init.py          weight initialisation
  kv_cache.py      KV cache keyed by (block, slot, layer)
  continuous_thought.py  Coconut: fed-back states as inputs, pass by pass, differentiable cache
  runtime.py       megatron parallel_state (TP groups, model-parallel RNG)
  compat.py        megatron-core's CUDA assumptions bridged on CPU; version differences
  megatron_import.py  megatron-core imported without its import-time torch.compile calls
  consolidated.py  rdpt's TP-unsharded safetensors checkpoint format
  hf_convert.py    conversion to/from the Hugging Face Huginn layout
  counting.py      parameter counts;  flops.py  FLOPs per token
"""

from __future__ import annotations

from pipeline.model.megatron_import import import_megatron_core

import_megatron_core()  # first, before any module below imports megatron (see there)

from pipeline.model.build import build_model, megatron_config  # noqa: E402
from pipeline.model.config import ModelConfig  # noqa: E402
from pipeline.model.init import normal_init  # noqa: E402

__all__ = ["ModelConfig", "build_model", "megatron_config", "normal_init"]
