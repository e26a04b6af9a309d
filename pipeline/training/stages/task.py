"""The `task` stage: fine-tuning on a reasoning-task dataset (`rdpt prep --task`).

    rdpt train configs/train/task-tiny.yaml data.path=data/arith train.stage=task \\
        data.pause.count=4 data.reasoning_steps=drop

The loss is the mean cross entropy over the targets the dataset marks (reasoning steps and
answer; with data.reasoning_steps=drop the answer only); the question, the padding and every
pause token (data.pause) carry none. r is drawn per step as in pretraining, so the same stage
trains a recurrent model and an r = 1 model (recurrence.mode=fixed, recurrence.fixed=1).
"""

from __future__ import annotations

import torch

from pipeline.training.stages.base import Stage
from pipeline.training.step import train_step


def task_loader(cfg, dims):
    """This rank's share of every global batch of task examples (TaskBatch), pauses inserted."""
    from pipeline.data.task_loader import TaskLoader

    return TaskLoader(
        cfg.data.path,
        split="train",
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum=dims.grad_accum,
        dp_rank=dims.dp_rank(),
        dp_size=dims.dp,
        seed=cfg.run.seed,
        shuffle=cfg.data.shuffle,
        steps=cfg.data.reasoning_steps,
        pause_count=cfg.data.pause.count,
        pause_placement=cfg.data.pause.placement,
        pause_seed=cfg.data.pause.seed,
    )


def masked_loss(engine, mb, *, r: int, n_grad: int, cfg, device) -> torch.Tensor:
    """Mean cross entropy over the trained targets (targets >= 0) of the micro-batch."""
    targets = mb.targets.to(device)
    out = engine(
        mb.inputs.to(device),
        targets,
        r=r,
        backprop_depth=n_grad,
        state_init="random",
        state_seed=cfg.run.seed,
        sample_ids_B=mb.sample_ids,
    )
    return out.loss_BS.float().sum() / (targets >= 0).sum().clamp_min(1)


def task_step(engine, batches, step, *, r, n_grad, ctx, hooks):
    return train_step(
        engine, batches, step, r=r, n_grad=n_grad, ctx=ctx, hooks=hooks, loss_fn=masked_loss
    )


TASK = Stage(name="task", step=task_step, loader=task_loader)
