"""The optimizer of the published Huginn run (`optim.name: ellis_adam`): an Adam variant.

    opt = EllisAdamCore(groups, lr=4e-5, betas=(0.9, 0.95), eps=1e-6, weight_decay=4e-5,
                        peak_lr=4e-5)
    bind_zero_layout(opt, engine)      # after deepspeed.initialize (training/engine.py does it)

The update of one tensor p with gradient g at step t (1-based), as in the reference training
code of huginn-0125 (its `ELLISAdam` with atan_adam, update_clipping, running_init and
decouple_wd on):

    first step only:  m = g,  v = g^2                      (moments from the first gradient)
    m = b1 m + (1 - b1) g
    v = b2 v + (1 - b2) g^2
    v = max(v, eps^2)                                      (kept in the state)
    rms = sqrt(mean over the tensor of g^2 / v)            (per-tensor update clipping)
    a = lr / max(rms, 1) / (1 - b1^t)
    p = p * (1 - weight_decay * lr / peak_lr)              (decoupled weight decay)
    p = p - a * atan2(m, sqrt(v / (1 - b2^t)))             (Adam-atan2: no epsilon)

atan2(m, d) is m/d for |m| << d and bounded by pi/2 otherwise, so no epsilon is needed to keep a
tiny denominator from blowing up a step. Like the reference, the bias corrections are applied
even though the moments start at the first gradient (the first step is 1/(1 - b1) = 10 times
larger than a plain Adam step of the same gradient; the warmup makes that lr tiny).

Weight decay: `weight_decay` is the fraction removed per step at the peak learning rate
(4e-5 in the published run) and scales with lr/peak_lr along the schedule. torch's AdamW
removes lr * weight_decay per step, so the reference's 4e-5 at lr 4e-5 is AdamW's
weight_decay = 1.0; AdamW's usual 0.1 at lr 4e-5 removes 4e-6 per step, ten times less.

Per-tensor statistics under ZeRO and TP: DeepSpeed's ZeRO-1/2/3 hand the optimizer flat
partitions that cut tensors anywhere, and tensor parallelism splits tensors across ranks. The
one statistic that needs a whole tensor, rms, is therefore computed per *logical* tensor:
`bind_zero_layout` records which slice of which flat partition belongs to which model
parameter (a key), every rank sums g^2/v and the element count per key, and one all-reduce of
that small vector over all ranks gives every rank the same per-tensor mean. Copies (data
parallel replicas, parameters replicated over TP) count in both the sum and the count, so the
mean is unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from pipeline.training.zero_layout import Segment, tensor_layout


class EllisAdamCore(torch.optim.Optimizer):
    """Adam-atan2 with per-tensor update clipping, moments initialised from the first gradient
    and decoupled weight decay relative to the peak lr (see the module docstring)."""

    def __init__(
        self,
        params,
        lr: float = 4e-5,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-6,
        weight_decay: float = 4e-5,
        *,
        peak_lr: float | None = None,
        update_clipping: bool = True,
        running_init: bool = True,
    ):
        if lr <= 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"ellis_adam: bad lr={lr}, eps={eps} or weight_decay={weight_decay}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            peak_lr=peak_lr if peak_lr is not None else lr,
            update_clipping=update_clipping,
            running_init=running_init,
        )
        super().__init__(params, defaults)
        self._layout: dict[int, list[Segment]] = {}
        self._n_keys = 0
        self._reduce = False
        self.last_clip_fraction: torch.Tensor | None = None
        """Fraction of tensors whose update was clipped (rms > 1) in the last step (a device
        tensor: reading it is the caller's sync, only when telemetry is due)."""

    # ------------------------------------------------------------------ layout
    def bind_layout(self, layout: dict[int, list[Segment]], n_keys: int) -> None:
        """Per-tensor statistics by model parameter: `layout` maps id(optimizer tensor) to its
        segments; every rank must bind the same `n_keys` (sums are all-reduced over the world)."""
        self._layout = dict(layout)
        self._n_keys = n_keys
        self._reduce = dist.is_available() and dist.is_initialized()

    def _segments(self, p: torch.Tensor) -> list[Segment] | None:
        return self._layout.get(id(p))

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = []  # (group, p, g, state)
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float() if p.grad.dtype != torch.float32 else p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    if group["running_init"]:
                        state["exp_avg"] = g.detach().clone()
                        state["exp_avg_sq"] = g.detach().pow(2)
                    else:
                        state["exp_avg"] = torch.zeros_like(g)
                        state["exp_avg_sq"] = torch.zeros_like(g)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                todo.append((group, p, g, state))
        rms = self._tensor_rms(todo)
        for i, (group, p, _g, state) in enumerate(todo):
            b1, b2 = group["betas"]
            lr = float(group["lr"])
            state["step"] += 1
            t = state["step"]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            if group["update_clipping"]:
                scale = torch.clamp(rms[i], min=1.0)  # per element: one value per segment
            else:
                scale = None
            step_size = lr / (1 - b1**t)
            denom = v.sqrt().div_(math.sqrt(1 - b2**t))
            update = torch.atan2(m, denom)
            if scale is not None:
                update.div_(scale)
            if group["weight_decay"]:
                p.mul_(1 - group["weight_decay"] * lr / group["peak_lr"])
            p.add_(update.to(p.dtype), alpha=-step_size)
        return loss

    def _tensor_rms(self, todo) -> list[torch.Tensor]:
        """Per tensor of `todo`: its rms(g / sqrt(v)) broadcastable over the tensor (a scalar, or
        one value per element when the tensor is a flat partition of several parameters).
        Clamps v to eps^2 in place first (the reference keeps the clamped value)."""
        ratios, seg_of = [], []
        for group, p, g, state in todo:
            v = state["exp_avg_sq"]
            if group["update_clipping"]:
                v.clamp_(min=group["eps"] ** 2)
            ratios.append(g.pow(2).div_(v) if group["update_clipping"] else None)
            seg_of.append(self._segments(p))
        if not any(r is not None for r in ratios):
            return [torch.ones(()) for _ in todo]
        device = next(r.device for r in ratios if r is not None)
        n_keys = self._n_keys
        sums = torch.zeros(2 * n_keys, dtype=torch.float64, device=device)
        for ratio, segs in zip(ratios, seg_of, strict=True):
            if ratio is None or segs is None:
                continue
            flat = ratio.reshape(-1)
            for s in segs:
                sums[s.key] += flat[s.start : s.start + s.length].double().sum()
                sums[n_keys + s.key] += s.length
        if self._reduce and n_keys:
            dist.all_reduce(sums)
        mean = sums[:n_keys] / sums[n_keys:].clamp(min=1)
        seen = sums[n_keys:] > 0
        unbound = [
            r.double().mean()
            for r, s in zip(ratios, seg_of, strict=True)
            if r is not None and s is None
        ]
        all_means = torch.cat([mean[seen], torch.stack(unbound)]) if unbound else mean[seen]
        if all_means.numel():
            self.last_clip_fraction = (all_means > 1.0).double().mean()
        out = []
        for ratio, segs in zip(ratios, seg_of, strict=True):
            if ratio is None:
                out.append(torch.ones((), device=device))
            elif segs is None:  # an unbound tensor is one logical tensor, held whole here
                out.append(ratio.double().mean().sqrt().float())
            else:
                per = torch.ones(ratio.numel(), dtype=torch.float32, device=device)
                for s in segs:
                    per[s.start : s.start + s.length] = mean[s.key].sqrt().float()
                out.append(per.view_as(ratio) if ratio.dim() else per)
        return out


def bind_zero_layout(optimizer: EllisAdamCore, engine) -> dict[int, list[Segment]]:
    """Tell `optimizer` (inside DeepSpeed `engine`) which slice of each tensor it steps belongs to
    which model parameter (zero_layout.tensor_layout)."""
    layout, n_keys = tensor_layout(engine)
    optimizer.bind_layout(layout, n_keys)
    return layout
