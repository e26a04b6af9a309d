"""The parallel layout of a training run, and the one function that applies it.

    dims = ParallelDims.from_config(cfg, world_size=8)   # fails here, every degree listed
    engine = parallelize(lambda dtype: build_model(cfg.model, params_dtype=dtype), dims, cfg)

`ParallelDims` is the only layout validator: it runs before any process group exists (the
CLI and `rdpt submit` call it too) and names every degree in its errors.

`parallelize` applies everything that is not the model's own business, in this order (each
step needs the one before it):

  1. Tensor parallelism: megatron-core's parallel_state with `dims.tp`. The TP leaves
     (column/row-parallel linears, vocab-parallel embedding) are chosen in the model's module
     specs and shard themselves from parallel_state when they are built.
  2. Construction: under ZeRO-3 inside `deepspeed.zero.Init`, so every parameter is
     partitioned the moment it exists and no rank ever holds the whole model; otherwise plainly.
  3. Activation checkpointing per core iteration (`parallel.activation_checkpointing`): each
     graded iteration keeps only its input and recomputes the rest in backward.
  4. torch.compile of one core iteration (`train.compile`), wrapped around the checkpointed
     function (as torchtitan orders AC before compile): one compiled region reused r times.
  5. The DeepSpeed wrap (engine.py): optimizer, ZeRO stage, accumulation, clipping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.common.errors import RdptConfigError


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of parallelism and the batch decomposition of one optimizer step.

    global batch = micro_batch_size x dp x grad_accum, world = tp x dp (pp is always 1)."""

    world_size: int
    tp: int = 1
    pp: int = 1
    micro_batch_size: int = 1
    global_batch_size: int | None = None  # None: micro_batch_size x dp (no accumulation)

    def __post_init__(self) -> None:
        self._validate()

    @classmethod
    def from_config(cls, cfg, world_size: int) -> ParallelDims:
        """The layout of TrainConfig `cfg` on `world_size` processes, model rules included."""
        dims = cls(
            world_size=world_size,
            tp=cfg.parallel.tp,
            micro_batch_size=cfg.train.micro_batch_size,
            global_batch_size=cfg.train.global_batch_size,
        )
        dims.check_model(cfg.model)
        return dims

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def grad_accum(self) -> int:
        if self.global_batch_size is None:
            return 1
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    def dp_rank(self) -> int:
        """This process's data-parallel rank (megatron-core's parallel_state: after step 1 of
        parallelize)."""
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank()

    def _describe(self) -> str:
        return f"(world_size={self.world_size}, tp={self.tp}, pp={self.pp})"

    def _validate(self) -> None:
        for name in ("world_size", "tp", "pp", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise RdptConfigError(f"parallel.{name}: must be >= 1 {self._describe()}")
        if self.pp != 1:
            raise RdptConfigError(
                f"parallel.pp: pipeline parallelism is not supported (use 1) {self._describe()}"
            )
        if self.world_size % (self.tp * self.pp):
            raise RdptConfigError(
                f"parallel.tp={self.tp} does not divide the world size {self.world_size} "
                f"(world = tp x dp) {self._describe()}"
            )
        gb, mb, dp = self.global_batch_size, self.micro_batch_size, self.dp
        if gb is not None and gb % (mb * dp):
            raise RdptConfigError(
                f"train.global_batch_size={gb} is not divisible by train.micro_batch_size x "
                f"data-parallel size = {mb} x {dp} = {mb * dp} (world {self.world_size} = tp "
                f"{self.tp} x dp {dp}); choose a global batch that is a multiple of {mb * dp}"
            )

    def check_model(self, model_cfg, seq_len: int | None = None) -> None:
        """Model-dependent rules: heads, vocab and ffn divisible by tp; seq_len by tp."""
        model_cfg.check(tp=self.tp)
        if seq_len is not None and seq_len % self.tp:
            raise RdptConfigError(
                f"data.seq_len: {seq_len} is not divisible by parallel.tp {self._describe()}"
            )


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
    # 3. activation checkpointing per core iteration
    if cfg.parallel.activation_checkpointing:
        model.wrap_iteration(checkpointed)
    # 4. compile one core iteration (the region that runs r times)
    if compile_enabled(cfg):
        model.wrap_iteration(torch.compile)
    # 5. the DeepSpeed wrap: optimizer, ZeRO, accumulation, clipping
    return build_engine(model, cfg, dims, mpu=MegatronMpu())
