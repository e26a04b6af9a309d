"""Learning-rate schedules as pure functions of the optimizer step.

    lr = lr_at(step, optim_cfg, max_steps)

A pure function needs no scheduler object in the checkpoint (the step is enough), gives the
same value on every rank and is trivially exact on resume. Two shapes:

- ``cosine``: linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine decay to
  ``min_lr`` at ``max_steps`` (the paper's recipe).
- ``wsd`` (warmup-stable-decay): linear warmup, constant ``lr``, then a linear decay to
  ``min_lr`` over the last ``decay_fraction`` of ``max_steps``; the stable phase can be
  extended (``train.max_steps`` raised) without changing what was already trained.
"""

from __future__ import annotations

import math


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup: step 0 trains at lr/warmup (never exactly 0), reaches 1 at warmup."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def cosine_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup then half-cosine from `lr` to `min_lr` at `max_steps`."""
    if step < warmup_steps:
        return lr * warmup_factor(step, warmup_steps)
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def wsd_lr(
    step: int,
    *,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    max_steps: int,
    decay_fraction: float,
    cooldown_steps: int | None = None,
) -> float:
    """Warmup, stable at `lr`, then linear decay to `min_lr` over the last `cooldown_steps`
    steps (or the last `decay_fraction` of max_steps)."""
    if step < warmup_steps:
        return lr * warmup_factor(step, warmup_steps)
    if cooldown_steps:
        decay_steps = cooldown_steps
    else:
        decay_steps = max(1, int(round(decay_fraction * max_steps)))
    decay_start = max(warmup_steps, max_steps - decay_steps)
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return lr + (min_lr - lr) * progress


def lr_at(step: int, optim, max_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) under `optim` (OptimConfig)."""
    common = dict(
        lr=optim.lr, min_lr=optim.min_lr, warmup_steps=optim.warmup_steps, max_steps=max_steps
    )
    if optim.schedule == "cosine":
        return cosine_lr(step, **common)
    if optim.schedule == "wsd":
        cooldown = getattr(optim, "cooldown_steps", None)
        return wsd_lr(step, decay_fraction=optim.decay_fraction, cooldown_steps=cooldown, **common)
    if optim.schedule == "constant":
        return optim.lr * warmup_factor(step, optim.warmup_steps)
    raise ValueError(f"optim.schedule: unknown schedule {optim.schedule!r}")
