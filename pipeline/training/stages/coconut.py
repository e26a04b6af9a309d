"""The `coconut` stage: continuous-thought fine-tuning with a curriculum (Coconut).

    rdpt train configs/train/task-tiny.yaml data.path=data/arith train.stage=coconut \\
        coconut.thoughts_per_step=2 coconut.max_stages=3 coconut.epochs_per_stage=2

At curriculum stage k (= min(first_stage + epoch // epochs_per_stage, max_stages), a function
of the data epoch, or of the optimizer step with coconut.steps_per_stage, so a resumed run
continues mid-stage exactly where it stopped) every example becomes

    question <|begin_thought|> [k' x c continuous thoughts] <|end_thought|> steps k'+1.. answer

with k' = min(k, its number of steps) (coconut.pad_thoughts: k x c thoughts whatever k', the
count a test-time `--thoughts` knob can match); stage 0 is the plain chain of thought (no
markers).
Each thought is the fed-back state of the position before it (coconut.feedback: coda | core,
pipeline/model/continuous_thought.py), computed pass by pass with the KV cache reused, and
gradients flow through all passes. The examples of a micro-batch share the passes: left-padded
so that their first thoughts line up, a micro-batch takes max(thoughts) + 2 batched passes
(`batched_thought_loss`), not one loop per example. The loss is the mean cross entropy over
the remaining language steps and the answer (not over thoughts or the markers). r is drawn
per step as in pretraining and applies to every position, thoughts included.

The model is called pass by pass outside the DeepSpeed engine's forward (engine.module), which
ZeRO 0-2 allow (their hooks are on gradients); ZeRO-3 is refused by resolve.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from pipeline.common.errors import RdptConfigError
from pipeline.training.stages.base import Stage
from pipeline.training.stages.task import task_loader
from pipeline.training.step import train_step

log = logging.getLogger("rdpt.train")


def coconut_sequence(
    tokens, segments, mask, stage: int, c: int, bot_id: int, eot_id: int, pad: bool = False
):
    """(before ids, number of thoughts, after ids, after mask) of one example at `stage`.

    tokens/segments/mask: the example without padding (segments: 0 question, k step k, -1
    answer; task_loader.py). The first k' = min(stage, steps) steps become k' x c thoughts, or
    stage x c with `pad` (coconut.pad_thoughts: a count known at test time)."""
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
    return before, (stage if pad else k) * c, after, after_mask


def coconut_loss(engine, mb, *, r: int, n_grad: int, cfg, device, step: int) -> torch.Tensor:
    """Mean cross entropy over the trained targets of the micro-batch's examples, all of them
    in one batched multi-pass forward (continuous_thought.batched_thought_loss)."""
    from pipeline.model.continuous_thought import ThoughtSequence, batched_thought_loss

    model = getattr(engine, "module", engine)
    stage = cfg.coconut.stage_at(int(mb.epoch), step)
    ids = _special_ids(cfg)
    seqs = []
    for b in range(mb.tokens.shape[0]):
        before, n, after, after_mask = coconut_sequence(
            mb.tokens[b].numpy(),
            mb.segments[b].numpy(),
            mb.mask[b].numpy(),
            stage,
            cfg.coconut.thoughts_per_step,
            ids["<|begin_thought|>"],
            ids["<|end_thought|>"],
            cfg.coconut.pad_thoughts,
        )
        length = len(before) + n + len(after)
        if length > cfg.model.max_seq_len:
            raise RdptConfigError(
                f"coconut: sample {int(mb.sample_ids[b])} at stage {stage} has {length} "
                f"positions, more than model.max_seq_len={cfg.model.max_seq_len}"
            )
        seqs.append(ThoughtSequence(before, n, after, after_mask, int(mb.sample_ids[b])))
    loss_sum, count = batched_thought_loss(
        model,
        seqs,
        r=r,
        n_grad=n_grad,
        feedback=cfg.coconut.feedback,
        state_init="random",
        state_seed=cfg.run.seed,
        pad_id=ids.get("<|pad|>", 0),
    )
    return loss_sum / max(count, 1)


_IDS: dict[str, dict] = {}


def _special_ids(cfg) -> dict:
    if cfg.data.path not in _IDS:
        from pipeline.data.loader import open_dataset

        _IDS[cfg.data.path] = open_dataset(cfg.data.path).manifest["special_ids"]
    return _IDS[cfg.data.path]


def coconut_step(engine, batches, step, *, r, n_grad, ctx, hooks):
    stage = ctx.cfg.coconut.stage_at(int(batches[0].epoch), step)
    if getattr(coconut_step, "_last_stage", None) != stage and ctx.is_main:
        log.info("coconut: stage %d at step %d (epoch %d)", stage, step, int(batches[0].epoch))
    coconut_step._last_stage = stage
    loss_fn = functools.partial(coconut_loss, step=step)
    return train_step(
        engine, batches, step, r=r, n_grad=n_grad, ctx=ctx, hooks=hooks, loss_fn=loss_fn
    )


COCONUT = Stage(name="coconut", step=coconut_step, loader=task_loader)
