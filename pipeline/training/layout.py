"""The parallel layout of a training run: `ParallelDims`, the only layout validator.

    dims = ParallelDims.from_config(cfg, world_size=8)   # fails here, every degree listed
    dims.tp, dims.dp, dims.grad_accum

It runs before any process group exists (`rdpt train`, `rdpt submit` and every rank call it)
and names every degree in its errors. parallel.py applies the layout.
"""

from __future__ import annotations

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
