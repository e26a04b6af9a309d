"""The parallel layout of a training run, and the one function that applies it.

    dims = ParallelDims.from_config(cfg, world_size=8)   # layout.py: fails here, every degree
    engine = parallelize(lambda dtype: build_model(cfg.model, params_dtype=dtype), dims, cfg)

`parallelize` applies everything that is not the model's own business, in this order (each
step needs the one before it):

  1. Tensor parallelism: megatron-core's parallel_state with `dims.tp`. The TP leaves
     (column/row-parallel linears, vocab-parallel embedding) are chosen in the model's module
     specs and shard themselves from parallel_state when they are built.
  2. Construction: under ZeRO-3 inside `deepspeed.zero.Init`, so every parameter is
     partitioned the moment it exists and no rank ever holds the whole model; otherwise plainly.
     Then `model.init_from` weights, if any, replace the random init (pretrained.py).
  3. Activation checkpointing per core iteration (`parallel.activation_checkpointing`): each
     graded iteration keeps only its input and recomputes the rest in backward.
  4. torch.compile of one core iteration (`train.compile`), wrapped around the checkpointed
     function (as torchtitan orders AC before compile): one compiled region reused r times.
  5. The DeepSpeed wrap (engine.py): optimizer, ZeRO stage, accumulation, clipping.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.training.layout import ParallelDims


def checkpointed(iteration: Callable) -> Callable:
    """Activation checkpointing of one core iteration: with gradients on, keep only the inputs
    and recompute the iteration in backward (exact); without gradients, run it plainly."""
    import torch
    from torch.utils.checkpoint import checkpoint

    def run(s_SBH, e_SBH, rope):
        if torch.is_grad_enabled():
            return checkpoint(iteration, s_SBH, e_SBH, rope, use_reentrant=False)
        return iteration(s_SBH, e_SBH, rope)

    return run


def compile_enabled(cfg) -> bool:
    """train.compile: true, false, or auto (= on where CUDA is present)."""
    import torch

    if cfg.train.compile == "auto":
        return torch.cuda.is_available()
    return bool(cfg.train.compile)


def parallelize(build: Callable, dims: ParallelDims, cfg):
    """Build the model with `build(params_dtype)` and return the DeepSpeed engine around it,
    applying the steps of the module docstring in that order (torch.distributed must be up)."""
    import torch

    from pipeline.model.runtime import init_model_parallel
    from pipeline.training.engine import MegatronMpu, build_engine, zero3_construction

    # 1. tensor parallelism (the TP leaves read parallel_state when they are built)
    init_model_parallel(tp=dims.tp, seed=cfg.run.seed)
    # 2. construction (ZeRO-3: partitioned as it is built); fp32 master weights in every case
    with zero3_construction(cfg, dims):
        model = build(torch.float32)
    if cfg.model.init_from:
        from pipeline.training.pretrained import load_pretrained, read_pretrained

        weights = read_pretrained(cfg.model.init_from)
        weights.check_matches(cfg.model)
        load_pretrained(model, weights, zero_stage=cfg.parallel.zero_stage)
    # 3. activation checkpointing per core iteration
    if cfg.parallel.activation_checkpointing:
        model.wrap_iteration(checkpointed)
    # 4. compile one core iteration (the region that runs r times)
    if compile_enabled(cfg):
        model.wrap_iteration(torch.compile)
    # 5. the DeepSpeed wrap: optimizer, ZeRO, accumulation, clipping
    return build_engine(model, cfg, dims, mpu=MegatronMpu())
