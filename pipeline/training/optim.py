"""The optimizer of a training run, built from `optim` (decoupled weight decay, two groups).

    groups = param_groups(model, cfg.optim.weight_decay)   # matrices decayed, norms/biases not
    optimizer = build_optimizer(groups, cfg.optim)         # handed to DeepSpeed

A non-finite step must not touch the weights. Under ZeRO >= 1 (and with DeepSpeed's bf16
wrapper) DeepSpeed checks the gradients itself and skips the step; at ZeRO-0 in fp32 it calls
the plain optimizer's step() unchecked, so rdpt's optimizers can be told to skip their next
step (`skip_next_step()`), which the training step does when the ranks agree a step is bad.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.training.ellis_adam import EllisAdamCore

NO_DECAY_MARKERS = ("norm", "bias", "ln_f")


class SkipNextStep:
    """Mixin for a torch optimizer: `skip_next_step()` makes the next step() a no-op (the
    state, the weights and the moments stay exactly as they are)."""

    _skip_next = False

    def skip_next_step(self) -> None:
        self._skip_next = True

    def step(self, closure=None):
        if self._skip_next:
            self._skip_next = False
            return None
        return super().step(closure)


class AdamW(SkipNextStep, torch.optim.AdamW):
    """torch's AdamW (decoupled weight decay) that can skip a step."""


class EllisAdam(SkipNextStep, EllisAdamCore):
    """The published Huginn run's Adam-atan2 variant (training/ellis_adam.py) that can skip a
    step."""


def build_optimizer(groups: list[dict[str, Any]], optim) -> torch.optim.Optimizer:
    """The optimizer named by `optim` (an OptimSection) over `groups`."""
    if getattr(optim, "name", "adamw") == "ellis_adam":
        return EllisAdam(
            groups,
            lr=optim.lr,
            betas=tuple(optim.betas),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            peak_lr=optim.lr,
            update_clipping=optim.update_clipping,
            running_init=optim.running_init,
        )
    return AdamW(
        groups,
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: matrices decayed, norms/biases/qk_bias not (decoupled weight decay)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitioned params are flat
        if ndim < 2 or any(m in name for m in NO_DECAY_MARKERS):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
