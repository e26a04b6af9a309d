"""One optimizer step over the micro-batches of a global batch.

    result = train_step(engine, batches, step, r=12, n_grad=8, ctx=ctx, hooks=hooks)
    result.loss, result.nonfinite, result.stop_requested, result.grad_norm

Every rank runs the same r (drawn from seed and step) on its micro-batches; the first r - k
core iterations run without gradients. The ranks agree, in one all-reduce after the last
backward, on the mean loss, on whether the step is finite and on whether a stop signal
arrived; everything before that stays on the device (no host sync per micro-batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.training.optim import SkipNextStep


@dataclass
class StepResult:
    """The outcome of one optimizer step, identical on every rank."""

    loss: float
    """Mean loss over the global batch (nan when non-finite)."""
    nonfinite: bool
    """The loss or the gradients were not finite: the update was skipped."""
    stop_requested: bool
    """Some rank received SIGUSR1/SIGTERM: checkpoint and stop after this step."""
    grad_norm: float
    """Global gradient norm before clipping (nan when unknown or non-finite)."""


def lm_loss(engine, mb, *, r: int, n_grad: int, cfg, device) -> torch.Tensor:
    """The pretraining loss of one micro-batch: mean next-token cross entropy."""
    out = engine(
        mb.inputs.to(device),
        mb.targets.to(device),
        r=r,
        backprop_depth=n_grad,
        state_init="random",
        state_seed=cfg.run.seed,
        sample_ids_B=mb.sample_ids,
    )
    return out.loss_BS.float().mean()


def train_step(
    engine, batches, step: int, *, r: int, n_grad: int, ctx, hooks, loss_fn=lm_loss
) -> StepResult:
    """Forward/backward every micro-batch of `batches`, then one optimizer step (skipped by
    every rank alike when the loss or the gradients are not finite). `loss_fn(engine, mb, r=,
    n_grad=, cfg=, device=)` is the micro-batch's scalar loss (a fine-tuning stage's own)."""
    cfg, device = ctx.cfg, ctx.device
    zero0 = cfg.parallel.zero_stage == 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    last = len(batches) - 1
    for i, mb in enumerate(batches):
        loss = loss_fn(engine, mb, r=r, n_grad=n_grad, cfg=cfg, device=device)
        loss = hooks.loss(step, loss)
        engine.backward(loss)
        loss_sum += loss.detach().double()
        if i == last:
            # NOTE: before the boundary step() every rank must agree whether to apply it.
            stats = _agree(engine, loss_sum, ctx.stop.requested, zero0, device)
            if stats["bad"] and isinstance(engine.optimizer, SkipNextStep):
                # ZeRO-0 in fp32: DeepSpeed calls the plain optimizer without any overflow check
                engine.optimizer.skip_next_step()
        engine.step()
    nonfinite = stats["bad"] or not engine.was_step_applied()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if zero0:
        sq = stats["grad_sq"] / engine.dp_world_size
        grad_norm = math.sqrt(max(sq, 0.0)) if not nonfinite else float("nan")
    else:
        grad_norm = global_grad_norm(engine)
    return StepResult(
        loss=stats["loss_sum"] / (world * len(batches)),
        nonfinite=nonfinite,
        stop_requested=stats["stop"],
        grad_norm=grad_norm,
    )


def _agree(engine, loss_sum, stop_requested: bool, zero0: bool, device) -> dict:
    """One all-reduce of [loss sum, bad, stop, squared grad norm] over all ranks."""
    zero = torch.zeros((), dtype=torch.float64, device=device)
    sq = grad_sq_norm_local(engine, device) if zero0 else zero
    bad = (~torch.isfinite(loss_sum) | ~torch.isfinite(sq)).double()
    stop = torch.tensor(float(stop_requested), dtype=torch.float64, device=device)
    stats = torch.stack([loss_sum, bad, stop, sq])
    if dist.is_initialized():
        dist.all_reduce(stats)
    loss, bad, stop, sq = stats.cpu().tolist()
    return {"loss_sum": loss, "bad": bad > 0, "stop": stop > 0, "grad_sq": sq}


def grad_sq_norm_local(engine, device) -> torch.Tensor:
    """This rank's share of the squared global gradient norm (ZeRO-0, after DP all-reduce):
    tensor-parallel shards count on every TP rank, replicated parameters on TP rank 0 only;
    summed over all ranks and divided by dp this gives the squared global norm (fp64, on
    `device`, no host sync)."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in engine.module.parameters():
        if p.grad is None:
            continue
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            total += p.grad.detach().double().pow(2).sum()
    return total


def global_grad_norm(engine) -> float:
    """The pre-clip global gradient norm of the last optimizer step (nan when unknown)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)


def set_lr(engine, lr: float) -> float:
    """Set the learning rate of every param group (the schedule is a pure function of step)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    return lr
