"""The `coconut` stage: continuous-thought fine-tuning with a curriculum (Coconut).

    rdpt train configs/train/task-tiny.yaml data.path=data/arith train.stage=coconut \\
        coconut.thoughts_per_step=2 coconut.max_stages=3 coconut.epochs_per_stage=2

At curriculum stage k (= min(epoch // epochs_per_stage, max_stages), a function of the data
epoch, so a resumed run continues mid-stage exactly where it stopped) every example becomes

    question <|begin_thought|> [k' x c continuous thoughts] <|end_thought|> steps k'+1.. answer

with k' = min(k, its number of steps); stage 0 is the plain chain of thought (no markers).
Each thought is the fed-back state of the position before it (coconut.feedback: coda | core,
pipeline/model/continuous_thought.py), computed pass by pass with the KV cache reused, and
gradients flow through all passes. The loss is the mean cross entropy over the remaining
language steps and the answer (not over thoughts or the markers). r is drawn per step as in
pretraining and applies to every position, thoughts included.

The model is called pass by pass outside the DeepSpeed engine's forward (engine.module), which
ZeRO 0-2 allow (their hooks are on gradients); ZeRO-3 is refused by resolve.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.common.errors import RdptConfigError
from pipeline.training.stages.base import Stage
from pipeline.training.stages.task import task_loader
from pipeline.training.step import train_step

log = logging.getLogger("rdpt.train")


def coconut_sequence(tokens, segments, mask, stage: int, c: int, bot_id: int, eot_id: int):
    """(before ids, number of thoughts, after ids, after mask) of one example at `stage`.

    tokens/segments/mask: the example without padding (segments: 0 question, k step k, -1
    answer; task_loader.py)."""
    from pipeline.data.task_loader import PAD_SEGMENT

    tokens, segments, mask = map(np.asarray, (tokens, segments, mask))
    keep = segments != PAD_SEGMENT
    tokens, segments, mask = tokens[keep], segments[keep], mask[keep].astype(bool)
    n_steps = int(segments.max(initial=0))
    k = min(stage, n_steps)
    question = tokens[segments == 0]
    rest = (segments > k) | (segments < 0)
    if k == 0:
        return question, 0, tokens[rest], mask[rest]
    before = np.concatenate([question, [bot_id]])
    after = np.concatenate([[eot_id], tokens[rest]])
    after_mask = np.concatenate([[False], mask[rest]])
    return before, k * c, after, after_mask


def coconut_loss(engine, mb, *, r: int, n_grad: int, cfg, device) -> torch.Tensor:
    """Mean cross entropy over the trained targets of the micro-batch's examples."""
    from pipeline.model.continuous_thought import thought_forward

    model = getattr(engine, "module", engine)
    stage = cfg.coconut.stage_at(int(mb.epoch))
    ids = _special_ids(cfg)
    total = torch.zeros((), device=device)
    count = 0
    for b in range(mb.tokens.shape[0]):
        before, n, after, after_mask = coconut_sequence(
            mb.tokens[b].numpy(),
            mb.segments[b].numpy(),
            mb.mask[b].numpy(),
            stage,
            cfg.coconut.thoughts_per_step,
            ids["<|begin_thought|>"],
            ids["<|end_thought|>"],
        )
        length = len(before) + n + len(after)
        if length > cfg.model.max_seq_len:
            raise RdptConfigError(
                f"coconut: sample {int(mb.sample_ids[b])} at stage {stage} has {length} "
                f"positions, more than model.max_seq_len={cfg.model.max_seq_len}"
            )
        out = thought_forward(
            model,
            before,
            n,
            after,
            after_mask,
            r=r,
            n_grad=n_grad,
            feedback=cfg.coconut.feedback,
            state_init="random",
            state_seed=cfg.run.seed,
            sample_id=int(mb.sample_ids[b]),
        )
        total = total + out.loss_sum
        count += out.tokens
    return total / max(count, 1)


_IDS: dict[str, dict] = {}


def _special_ids(cfg) -> dict:
    if cfg.data.path not in _IDS:
        from pipeline.data.loader import open_dataset

        _IDS[cfg.data.path] = open_dataset(cfg.data.path).manifest["special_ids"]
    return _IDS[cfg.data.path]


def coconut_step(engine, batches, step, *, r, n_grad, ctx, hooks):
    stage = ctx.cfg.coconut.stage_at(int(batches[0].epoch))
    if getattr(coconut_step, "_last_stage", None) != stage and ctx.is_main:
        log.info("coconut: stage %d at step %d (epoch %d)", stage, step, int(batches[0].epoch))
    coconut_step._last_stage = stage
    return train_step(
        engine, batches, step, r=r, n_grad=n_grad, ctx=ctx, hooks=hooks, loss_fn=coconut_loss
    )


COCONUT = Stage(name="coconut", step=coconut_step, loader=task_loader)
