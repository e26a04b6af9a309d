"""Training stages: what a run trains and how one optimizer step runs (`train.stage`).

    stage = get_stage(cfg.train.stage)
    model = stage.prepare_model(build_model(cfg.model), cfg)   # before the DeepSpeed wrap
    loader = stage.loader(cfg, dims)                            # one item per optimizer step
    result = stage.step(engine, batches, step, r=r, n_grad=k, ctx=ctx, hooks=hooks)

`pretrain` is the language-model loss on packed sequences (pretraining.py); `task` fine-tunes
on a reasoning-task dataset (task.py); `coconut` is the continuous-thought curriculum
(coconut.py); `exit_gate` fits the learned exit gate on a frozen model (exit_gate.py). A
fine-tuning
stage is one module in this package that defines a `Stage` and one line in STAGES; the loop
in pipeline/train.py is the same for every stage.
"""

from __future__ import annotations

from pipeline.common.errors import RdptConfigError
from pipeline.training.stages.base import Stage


def get_stage(name: str) -> Stage:
    """The stage called `name` (RdptConfigError naming train.stage when there is none)."""
    from pipeline.training.stages.coconut import COCONUT
    from pipeline.training.stages.exit_gate import EXIT_GATE
    from pipeline.training.stages.pretraining import PRETRAIN
    from pipeline.training.stages.task import TASK

    stages = {s.name: s for s in (PRETRAIN, TASK, COCONUT, EXIT_GATE)}
    if name not in stages:
        raise RdptConfigError(f"train.stage: unknown stage {name!r} (one of {sorted(stages)})")
    return stages[name]
