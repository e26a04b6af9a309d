"""Parallel layout: validate degrees before any process group exists, then set up
megatron-core's parallel_state (tensor parallelism) and its model-parallel RNG.

    dims = ParallelDims(world_size=4, tp=2)     # fails here, with every degree listed, if wrong
    dims.check_model(model_cfg, seq_len=2048)
    initialize_parallel(tp=2, seed=1234)         # after torch.distributed is initialised
    ...
    destroy_parallel()

Data parallelism and ZeRO are applied by the training area (DeepSpeed) around the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import RdptConfigError


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of parallelism; dp is derived when not given (world_size / (tp * pp))."""

    world_size: int
    tp: int = 1
    pp: int = 1
    dp: int | None = None

    def __post_init__(self) -> None:
        self._validate()

    @property
    def dp_size(self) -> int:
        return self.dp if self.dp is not None else self.world_size // (self.tp * self.pp)

    def _describe(self) -> str:
        return f"(world_size={self.world_size}, tp={self.tp}, pp={self.pp}, dp={self.dp})"

    def _validate(self) -> None:
        for name in ("world_size", "tp", "pp"):
            if getattr(self, name) < 1:
                raise RdptConfigError(f"parallel.{name}: must be >= 1 {self._describe()}")
        if self.pp != 1:
            raise RdptConfigError(
                f"parallel.pp: pipeline parallelism is not supported (use 1) {self._describe()}"
            )
        if self.world_size % (self.tp * self.pp):
            raise RdptConfigError(
                f"parallel.tp: tp*pp = {self.tp * self.pp} does not divide the world size "
                f"{self._describe()}"
            )
        if self.dp is not None and self.dp * self.tp * self.pp != self.world_size:
            raise RdptConfigError(
                f"parallel.dp: dp*tp*pp = {self.dp * self.tp * self.pp} != world_size "
                f"{self._describe()}"
            )

    def check_model(self, model_cfg, seq_len: int | None = None) -> None:
        """Model-dependent rules: heads, vocab and ffn divisible by tp; seq_len by tp."""
        model_cfg.check(tp=self.tp)
        if seq_len is not None and seq_len % self.tp:
            raise RdptConfigError(
                f"data.seq_len: {seq_len} is not divisible by parallel.tp {self._describe()}"
            )


def initialize_parallel(tp: int = 1, seed: int = 0) -> None:
    """Initialise megatron parallel_state with tensor-parallel size `tp` on the existing
    torch.distributed group (created from the environment when missing), and seed the
    model-parallel RNG tracker. Idempotent for the same tp."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pipeline.distributed import init_process_group
    from pipeline.model.compat import model_parallel_seed

    if not dist.is_initialized():
        init_process_group()
    ParallelDims(world_size=dist.get_world_size(), tp=tp)
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != tp:
            raise RdptConfigError(
                f"parallel.tp: parallel_state already initialised with tp="
                f"{parallel_state.get_tensor_model_parallel_world_size()}, asked for {tp}"
            )
    else:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron parallel_state (the torch.distributed group stays)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
