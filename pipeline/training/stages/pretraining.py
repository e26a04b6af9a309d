"""The pretraining stage: next-token loss on packed sequences, r drawn per step."""

from __future__ import annotations

from pipeline.training.stages.base import Stage
from pipeline.training.step import train_step


def pretraining_loader(cfg, dims):
    """This rank's share of every global batch, in an order independent of the layout."""
    from pipeline.data.loader import ResumableLoader

    return ResumableLoader(
        cfg.data.path,
        split="train",
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum=dims.grad_accum,
        dp_rank=dims.dp_rank(),
        dp_size=dims.dp,
        seed=cfg.run.seed,
        shuffle=cfg.data.shuffle,
    )


PRETRAIN = Stage(name="pretrain", step=train_step, loader=pretraining_loader)
