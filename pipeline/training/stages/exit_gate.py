"""The `exit_gate` stage: fit the learned exit gate of a trained model, the model frozen.

    rdpt train configs/train/tiny.yaml run.name=tiny-gate train.stage=exit_gate \\
        model.exit_gate=true model.init_from=runs/tiny recurrence.mode=fixed \\
        recurrence.fixed=16 optim.lr=1e-2

For every micro-batch the frozen model runs r = recurrence.fixed core iterations without
gradients and decodes after each one, which gives each position's cross entropy CE_i after
iteration i. The exit targets y_i follow from how much going on still lowers it
(exit_gate.target / min_gain / sharpness; pipeline/model/exit_gate.py), and the loss is the
binary cross entropy of the gate's logit on the state s_i against y_i, averaged over the
positions with a target and over i = 1..r-1. Only the gate's 2h + 1 parameters carry
gradients; every other parameter stays bitwise as model.init_from gave it.

The data is the run's dataset: packed sequences (all positions) or, for a task dataset
(`rdpt prep --task`), the task examples with the task stage's loss mask (data.pause and
data.reasoning_steps apply as there). The model is called piece by piece outside the engine's
forward (engine.module), which ZeRO 0-2 allow; resolve refuses ZeRO-3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.model.exit_gate import exit_targets
from pipeline.training.stages.base import Stage
from pipeline.training.stages.pretraining import pretraining_loader
from pipeline.training.stages.task import task_loader
from pipeline.training.step import train_step


def train_only_the_gate(model, cfg):
    """Freeze every parameter but the exit gate's (resolve made sure the model has one)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.exit_gate.parameters():
        p.requires_grad_(True)
    return model


def gate_loader(cfg, dims):
    """The task stage's loader on a task dataset, the pretraining loader otherwise."""
    from pipeline.data.loader import open_dataset

    kind = open_dataset(cfg.data.path).manifest.get("kind")
    return (task_loader if kind == "task" else pretraining_loader)(cfg, dims)


def iteration_losses(model, inputs_BS, targets_BS, r: int, *, seed: int, sample_ids_B):
    """(states [s_1..s_r], CE [r, B, S]) of the frozen model, no gradients: CE_i is each
    position's cross entropy decoded after iteration i (0 where the target is < 0)."""
    with torch.no_grad():
        e_SBH = model.prelude(inputs_BS)
        s_SBH = model.initial_state(e_SBH, "random", seed, sample_ids_B)
        states, ce = [], []
        for _ in range(r):
            s_SBH = model.core_step(s_SBH, e_SBH)
            states.append(s_SBH)
            logits_BSV = model.coda(s_SBH).float()
            ce.append(
                F.cross_entropy(
                    logits_BSV.flatten(0, 1),
                    targets_BS.clamp_min(0).flatten(),
                    reduction="none",
                ).view_as(targets_BS)
            )
    return states, torch.stack(ce)


def gate_loss(engine, mb, *, r: int, n_grad: int, cfg, device) -> torch.Tensor:
    """Binary cross entropy of the gate against the exit targets (module docstring)."""
    model = getattr(engine, "module", engine)
    inputs_BS, targets_BS = mb.inputs.to(device), mb.targets.to(device)
    states, ce_RBS = iteration_losses(
        model, inputs_BS, targets_BS, r, seed=cfg.run.seed, sample_ids_B=mb.sample_ids
    )
    g = cfg.exit_gate
    y_RBS = exit_targets(ce_RBS, g.target, g.min_gain, g.sharpness)  # i = 1..r-1
    logits_RBS = torch.stack([model.exit_logits(s) for s in states[:-1]])
    return gate_bce(logits_RBS, y_RBS, targets_BS >= 0, g.balance)


def gate_bce(logits_RBS, y_RBS, valid_BS, balance: bool = False) -> torch.Tensor:
    """Mean binary cross entropy over the valid positions and iterations 1..r-1; with
    `balance` the exit term is weighted by (1 - mean y) / mean y (exit_gate.balance), so that
    both classes pull equally on the gate."""
    mask = valid_BS.expand_as(y_RBS).to(y_RBS.dtype)
    pos_weight = None
    if balance:
        mean_y = ((y_RBS * mask).sum() / mask.sum().clamp_min(1)).clamp(1e-4, 1 - 1e-4)
        pos_weight = (1 - mean_y) / mean_y
    bce = F.binary_cross_entropy_with_logits(
        logits_RBS, y_RBS, reduction="none", pos_weight=pos_weight
    )
    return (bce * mask).sum() / mask.sum().clamp_min(1)


def gate_step(engine, batches, step, *, r, n_grad, ctx, hooks):
    return train_step(
        engine, batches, step, r=r, n_grad=n_grad, ctx=ctx, hooks=hooks, loss_fn=gate_loss
    )


EXIT_GATE = Stage(
    name="exit_gate", step=gate_step, loader=gate_loader, prepare_model=train_only_the_gate
)
