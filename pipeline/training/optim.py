"""The optimizer of a training run, built from `optim` (decoupled weight decay, two groups).

    choice = choose_optimizer(cfg.optim, Platform.detect())  # torch (fused/foreach) or DeepSpeed
    groups = param_groups(model, cfg.optim.weight_decay)   # matrices decayed, norms/biases not
    optimizer = build_optimizer(groups, cfg.optim, choice) # handed to DeepSpeed

Which implementation (`optim.impl`): `auto` never compiles anything at start-up: DeepSpeed's
fused Adam only when its op was prebuilt at install time, otherwise torch's AdamW, fused
(one kernel for all tensors) on CUDA and `foreach` (multi-tensor) on CPU. `deepspeed` asks
for DeepSpeed's op even when that means a JIT build (needs nvcc of CUDA's major version);
`torch` always takes torch's.

A non-finite step must not touch the weights. Under ZeRO >= 1 (and with DeepSpeed's bf16
wrapper) DeepSpeed checks the gradients itself and skips the step; at ZeRO-0 in fp32 it calls
the plain optimizer's step() unchecked, so rdpt's optimizers can be told to skip their next
step (`skip_next_step()`), which the training step does when the ranks agree a step is bad.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from pipeline.training.ellis_adam import EllisAdamCore
from pipeline.training.platform import Platform

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


@dataclass(frozen=True)
class OptimizerChoice:
    impl: Literal["deepspeed", "torch"]
    """deepspeed: declared in the DeepSpeed config (its FusedAdam); torch: an instance built
    here and handed to deepspeed.initialize."""
    torch_kernel: Literal["fused", "foreach", "none"] = "none"
    """torch's AdamW kernel: fused (CUDA), foreach (CPU); none for DeepSpeed's or ellis_adam."""


def choose_optimizer(optim, platform: Platform) -> OptimizerChoice:
    """Which optimizer implementation `optim` (an OptimSection) gets on `platform`.

    Pure: it looks at nothing but its arguments, so the choice for any machine can be checked
    on this one. `auto` picks DeepSpeed's fused Adam only when it is prebuilt and CUDA is
    there; it never implies a JIT build."""
    name, impl = getattr(optim, "name", "adamw"), getattr(optim, "impl", "auto")
    if name != "adamw":  # rdpt's own optimizer object (ellis_adam), everywhere
        return OptimizerChoice("torch")
    if impl == "deepspeed" or (impl == "auto" and platform.cuda and platform.fused_adam_prebuilt):
        return OptimizerChoice("deepspeed")
    return OptimizerChoice("torch", "fused" if platform.cuda else "foreach")


def deepspeed_optimizer_section(optim) -> dict[str, Any]:
    """The DeepSpeed config's `optimizer` entry for impl=deepspeed (AdamW mode, no torch
    fallback: DeepSpeed loads or builds its FusedAdam op)."""
    return {
        "type": "AdamW",
        "params": {
            "lr": optim.lr,
            "betas": list(optim.betas),
            "eps": optim.eps,
            "weight_decay": optim.weight_decay,
            "torch_adam": False,
            "adam_w_mode": True,
        },
    }


def build_optimizer(
    groups: list[dict[str, Any]], optim, choice: OptimizerChoice | None = None
) -> torch.optim.Optimizer:
    """The optimizer named by `optim` (an OptimSection) over `groups`, with the torch kernel
    of `choice` (default: torch's own default kernel)."""
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
    kernel = choice.torch_kernel if choice is not None else "none"
    return AdamW(
        groups,
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        **({"fused": True} if kernel == "fused" else {}),
        **({"foreach": True} if kernel == "foreach" else {}),
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
