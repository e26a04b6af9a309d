"""How many core iterations each training step runs: randomized (Huginn) or fixed.

    cfg = RecurrenceConfig(mode="random", mean=32, sigma=0.5, backprop_depth=8, seed=1234)
    r, n_no_grad, n_grad = sample_iterations(cfg, step)

Randomized: tau ~ Normal(log(mean) - sigma^2/2, sigma), r = Poisson(exp(tau)) + 1 (mean about
mean + 1, median about mean - 3 for mean 32). The draw is a pure function of (seed, step): a
fresh numpy generator is seeded with both, so every rank, every resume and every data-parallel
size agrees without a collective.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import model_validator

from pipeline.common.config_io import ConfigModel
from pipeline.common.errors import RdptConfigError
from pipeline.model.depth import split_steps


class RecurrenceConfig(ConfigModel):
    """Training-time recurrence: the number of core iterations r per step and the truncated
    backprop depth k (only the last k iterations carry gradients)."""

    mode: Literal["random", "fixed"] = "random"
    """`random`: r = Poisson(exp(tau)) + 1 (Huginn); `fixed`: r = `fixed` every step."""
    mean: float = 32.0
    """rbar: target mean of the log-normal rate (the draws' mean is about rbar + 1)."""
    sigma: float = 0.5
    """Std of tau (log-normal spread)."""
    fixed: int = 32
    """r in `fixed` mode."""
    backprop_depth: int = 8
    """k: the last min(k, r) iterations carry gradients, the first max(r - k, 0) run no_grad."""
    max_r: int | None = None
    """Optional cap on sampled r (None = no cap)."""
    seed: int = 0
    """Seed of the per-step draw (r depends only on (seed, step))."""

    @model_validator(mode="after")
    def _validate(self) -> RecurrenceConfig:
        if self.backprop_depth < 1:
            raise RdptConfigError(
                f"recurrence.backprop_depth: k must be >= 1, got {self.backprop_depth}"
            )
        if self.fixed < 1:
            raise RdptConfigError(f"recurrence.fixed: r must be >= 1, got {self.fixed}")
        if self.mean <= 0:
            raise RdptConfigError(f"recurrence.mean: must be > 0, got {self.mean}")
        if self.sigma < 0:
            raise RdptConfigError(f"recurrence.sigma: must be >= 0, got {self.sigma}")
        if self.max_r is not None and self.max_r < 1:
            raise RdptConfigError(f"recurrence.max_r: must be >= 1, got {self.max_r}")
        return self


def sample_r(cfg: RecurrenceConfig, step: int) -> int:
    """The number of core iterations at optimizer step `step` (pure function of seed, step)."""
    if cfg.mode == "fixed":
        return cfg.fixed
    rng = np.random.default_rng([int(cfg.seed) & 0xFFFFFFFF, int(step) & 0xFFFFFFFF, 0x52445054])
    tau = rng.normal(np.log(cfg.mean) - 0.5 * cfg.sigma**2, cfg.sigma)
    r = int(rng.poisson(np.exp(tau))) + 1
    if cfg.max_r is not None:
        r = min(r, cfg.max_r)
    return r


def sample_iterations(cfg: RecurrenceConfig, step: int) -> tuple[int, int, int]:
    """(r, n_no_grad, n_grad) of optimizer step `step`: the draw and its truncated-backprop
    split."""
    r = sample_r(cfg, step)
    n_no_grad, n_grad = split_steps(r, cfg.backprop_depth)
    return r, n_no_grad, n_grad
