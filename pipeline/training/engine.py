"""DeepSpeed around the megatron-core model: config generated from TrainConfig, never by hand.

    ds_config = deepspeed_config(cfg, dims)           # dims: training.parallel.ParallelDims
    # what a GPU machine without a prebuilt fused Adam (no nvcc needed) would get:
    gpu_config = deepspeed_config(cfg, dims, Platform("cuda", fused_adam_prebuilt=False))
    engine = build_engine(model, cfg, dims)           # called by training.parallel.parallelize

- ZeRO stage, micro/global batch, gradient accumulation and clipping come from `cfg`.
- bf16 on GPU (fp32 on CPU, or whatever `train.precision` says), with DeepSpeed's overflow
  check on so a non-finite gradient norm skips the step instead of poisoning the optimizer.
  Under bf16: parameters in bf16 (matmuls), fp32 master weights and optimizer state, and at
  ZeRO 1-3 gradients accumulated and reduced in fp32 (`data_types.grad_accum_dtype`,
  `communication_data_type`). The latent state is fp32 in the model itself (recurrent.py).
- The optimizer (`optim.impl`, chosen by optim.choose_optimizer): by default torch's AdamW
  instance handed to DeepSpeed (fused kernel on CUDA, foreach on CPU); DeepSpeed's FusedAdam
  (declared in the config) only when its op is prebuilt or `optim.impl: deepspeed` asks for it,
  because otherwise it JIT-compiles at start-up (minutes, and nvcc of CUDA's major version).
  Weight decay is decoupled (AdamW) and skips norms and biases.
- Everything machine-dependent comes from a `Platform` (platform.py; default: this machine),
  so the config for another machine can be generated and checked here.
- `MegatronMpu` hands DeepSpeed megatron-core's `parallel_state` groups under the names it
  asks for (TP = DeepSpeed's "model parallel", DP = its "data parallel").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from pipeline.training.ellis_adam import EllisAdamCore, bind_zero_layout
from pipeline.training.optim import (
    build_optimizer,
    choose_optimizer,
    deepspeed_optimizer_section,
    param_groups,
)
from pipeline.training.platform import Platform

if TYPE_CHECKING:  # a type only: config.py imports the layout, which imports this module
    from pipeline.training.config import TrainConfig


def resolve_precision(cfg: TrainConfig, platform: Platform | None = None) -> str:
    """'bf16' or 'fp32' (auto = bf16 when CUDA is present)."""
    if cfg.train.precision == "auto":
        platform = platform or Platform.detect()
        return "bf16" if platform.cuda else "fp32"
    return cfg.train.precision


def deepspeed_config(cfg: TrainConfig, dims, platform: Platform | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for this run on `platform` (default: this machine); written
    to the run dir for reference only."""
    platform = platform or Platform.detect()
    dp, grad_accum = dims.dp, dims.grad_accum
    precision = resolve_precision(cfg, platform)
    zero: dict[str, Any] = {
        "stage": cfg.parallel.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": platform.cuda,
        "reduce_bucket_size": 50_000_000,
        "allgather_bucket_size": 50_000_000,
    }
    if cfg.parallel.zero_stage == 3:
        zero.update(
            stage3_gather_16bit_weights_on_model_save=False,
            stage3_param_persistence_threshold=10_000,
        )
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if precision == "bf16" and cfg.parallel.zero_stage >= 1:
        # NOTE: bf16 gradients summed over 256 micro-batches lose most of their bits; DeepSpeed
        # accumulates in bf16 by default. At ZeRO-0 it supports nothing but bf16 (its DDP path
        # raises on a mix), so there gradients accumulate in bf16 (documented).
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
        ds["communication_data_type"] = "fp32"
    if choose_optimizer(cfg.optim, platform).impl == "deepspeed":
        ds["optimizer"] = deepspeed_optimizer_section(cfg.optim)
    assert cfg.train.global_batch_size == cfg.train.micro_batch_size * dp * grad_accum
    return ds


class MegatronMpu:
    """megatron-core parallel_state under the names DeepSpeed's `mpu` argument expects."""

    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        self._ps = ps

    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    # DeepSpeed also asks for the tensor-parallel names directly.
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


def import_deepspeed():
    """`import deepspeed`, without the MLflow import DeepSpeed's autotuner makes at import time.

    NOTE: deepspeed/autotuning/autotuner.py tries `import mlflow` (with pandas, fastapi,
    pyarrow...) only to log its own tuning experiments, which rdpt never runs: 2-3 s of CPU in
    every rank, at every start. While DeepSpeed is imported here, `mlflow` reads as absent; it
    is importable again afterwards (rdpt's own tracker imports it where tracking is on).
    """
    import sys

    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError meanwhile
    try:
        import deepspeed
    finally:
        if hide and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op on CPU (~65 s, cold).

    NOTE: DeepSpeed builds it whenever it wraps torch.distributed (also when we created the
    group ourselves); it only serves inference all-reduce on CPU, which training never calls.
    """
    if torch.cuda.is_available():
        return
    import_deepspeed()
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(model: torch.nn.Module, cfg: TrainConfig, dims, mpu=None):
    """deepspeed.initialize with a generated config; torch.distributed must be up already.

    NOTE: the process group is created by pipeline.common.distributed.init_process_group() before
    this call; deepspeed.initialize then finds it and skips its own (slow, JIT) comm set-up.
    """
    deepspeed = import_deepspeed()
    skip_shm_comm_build()
    platform = Platform.detect()
    ds_config = deepspeed_config(cfg, dims, platform)
    groups = param_groups(model, cfg.optim.weight_decay)
    choice = choose_optimizer(cfg.optim, platform)
    optimizer = None if choice.impl == "deepspeed" else build_optimizer(groups, cfg.optim, choice)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=groups if optimizer is None else None,
        config=ds_config,
        mpu=mpu,
        dist_init_required=False,
    )
    if isinstance(optimizer, EllisAdamCore):  # per-tensor statistics over ZeRO partitions
        bind_zero_layout(optimizer, engine)
    return engine


def zero3_construction(cfg: TrainConfig, dims):
    """Where to build the model: under ZeRO-3, inside `deepspeed.zero.Init`, so every parameter
    is partitioned as soon as its module is built (no rank ever holds the full model)."""
    import contextlib

    if cfg.parallel.zero_stage != 3:
        return contextlib.nullcontext()
    deepspeed = import_deepspeed()
    skip_shm_comm_build()
    ds = deepspeed_config(cfg, dims)
    # NOTE: zero.Init checks the batch arithmetic against a world size of its own; it needs
    # only the ZeRO section, so give it no global batch to disagree with.
    for key in ("train_batch_size", "gradient_accumulation_steps"):
        ds.pop(key)
    # NOTE: no dtype argument: DeepSpeed 0.19's zero.Init then takes it from the config (fp32, or
    # bf16 when bf16 is on: parameters are built in the dtype they compute in). An explicit
    # dtype is misread on accelerators without fp16 (`dtype or fp16 if fp16_supported() else
    # bf16 if is_bf16_supported else fp32`: the last test is a method, always true), which on
    # CPU built every fp32 parameter in bf16 and broke ZeRO-3 parity with the other stages.
    return deepspeed.zero.Init(config_dict_or_path=ds, mpu=MegatronMpu())
