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
  4. torch.compile (`train.compile`, `compile_model`): one core iteration, wrapped around the
     checkpointed function (as torchtitan orders AC before compile), is one compiled region
     reused r times; the prelude and coda blocks are compiled in place (parameter names do
     not change). Dynamo sees a bounded set of variants (grad on/off, state with or without
     grad), all met in the first steps: no recompilation after warm-up.
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


def compile_enabled(cfg, cuda: bool | None = None) -> bool:
    """train.compile: on (true), off (false), or auto = on where CUDA is present and the ZeRO
    stage is below 3 (ZeRO-3 gathers parameters in module hooks, which compiled regions
    would have to trace; not tried on a GPU yet)."""
    import torch

    if cfg.train.compile == "auto":
        cuda = torch.cuda.is_available() if cuda is None else cuda
        return cuda and cfg.parallel.zero_stage < 3
    return bool(cfg.train.compile)


def compile_model(model) -> None:
    """torch.compile the model's regions in place: the core iteration (after activation
    checkpointing was applied to it) and the prelude and coda blocks."""
    import torch

    model.wrap_iteration(torch.compile)
    model.prelude_block.compile()
    model.coda_block.compile()


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
    # 4. compile: the core iteration (the region that runs r times), prelude and coda
    if compile_enabled(cfg):
        compile_model(model)
    # 5. the DeepSpeed wrap: optimizer, ZeRO, accumulation, clipping
    return build_engine(model, cfg, dims, mpu=MegatronMpu())
