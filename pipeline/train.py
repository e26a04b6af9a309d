"""The training loop of `rdpt train`, top to bottom. Every rank runs `main` once.

Order of events:
  1. this process joins the run: process group, logging, stop signals, device
  2. the parallel layout, then the model built and wrapped by `parallelize` (tensor
     parallelism, ZeRO-3 construction, activation checkpointing, compile, the DeepSpeed engine)
  3. the dataset and the stage's resumable loader (train.stage: pretraining by default)
  4. resume: the newest checkpoint that verifies restores the engine, the RNG, the loader's
     cursor and the TrainerState (a run already at train.max_steps ends here)
  5. for each optimizer step: draw r (the same on every rank), set the learning rate, run one
     step over all micro-batches, log (telemetry every telemetry.interval steps); then stop
     after too many non-finite steps in a row, validate and checkpoint when due, and stop
     after a checkpoint on SIGUSR1/SIGTERM
  6. when every step ran: a final validation and checkpoint, and the COMPLETED marker

The return value is the process exit code: 0 done, 85 stopped on a signal after a checkpoint
(the Slurm script requeues), 86 stopped after too many non-finite steps.
"""

from __future__ import annotations

import logging
import signal
import sys
import time

from pipeline.common import exitcodes
from pipeline.common.atomic import atomic_write_json
from pipeline.common.errors import RdptError
from pipeline.data.loader import open_dataset
from pipeline.model import build_model
from pipeline.model.runtime import destroy_model_parallel
from pipeline.training.checkpoint import RunCheckpoints
from pipeline.training.config import TrainConfig
from pipeline.training.hooks import TrainHooks, hooks_from_config
from pipeline.training.layout import ParallelDims
from pipeline.training.metrics import StepMeter, open_tracker
from pipeline.training.parallel import parallelize
from pipeline.training.rank import setup_rank
from pipeline.training.recurrence import sample_iterations
from pipeline.training.schedules import lr_at
from pipeline.training.stages import get_stage
from pipeline.training.state import run_identity
from pipeline.training.step import set_lr
from pipeline.training.telemetry import Telemetry
from pipeline.training.validation import run_validation

log = logging.getLogger("rdpt.train")


def main(
    cfg: TrainConfig,
    resume: str = "auto",
    hooks: TrainHooks | None = None,
    early_signals: list[int] | None = None,
) -> int:
    """Train `cfg` (resolved: training/resolve.py) as one rank; return an exit code.

    `resume`: auto | none | a checkpoint directory. `hooks`: observers / fault injection
    (default: the `debug` section). `early_signals`: stop signals received before this call."""
    ctx = setup_rank(cfg, early_signals)
    try:
        return train(ctx, resume, hooks or hooks_from_config(cfg.debug, ctx.run_dir, ctx.rank))
    except Exception as e:  # every other rank stops within a second, with this exit code
        if isinstance(e, RdptError):  # said before the peers hear of it: a launcher may
            print(f"rdpt train (rank {ctx.rank}): error: {e}", file=sys.stderr, flush=True)
            e.reported = True  # end this process as soon as they have
        ctx.peers.post(f"{type(e).__name__}: {e}", exitcodes.exit_code_for(e))
        raise
    finally:
        ctx.peers.stop()


def train(ctx, resume: str, hooks: TrainHooks) -> int:
    """Steps 2-6 of the module docstring, on this rank."""
    cfg = ctx.cfg
    stage = get_stage(cfg.train.stage)  # what is trained, and how one step runs
    dims = ParallelDims.from_config(cfg, ctx.world)

    def build(dtype):
        return stage.prepare_model(build_model(cfg.model, params_dtype=dtype), cfg)

    engine = parallelize(build, dims, cfg)
    telemetry = Telemetry(engine, cfg)  # state / gradient / update statistics when due

    dataset = open_dataset(cfg.data.path)
    loader = stage.loader(cfg, dims)
    tokens_per_step = cfg.train.global_batch_size * dataset.seq_len
    tracker = open_tracker(ctx, dims, dataset)
    identity = run_identity(cfg, dims, dataset)
    ckpts = RunCheckpoints(ctx, identity, dataset.tokenizer_path, tracker, hooks)
    state = ckpts.resume(engine, loader, resume, tokens_per_step)

    code, start = exitcodes.OK, state.step
    meter = StepMeter(cfg, dataset.seq_len, ctx.world, tracker)
    batches = iter(loader)
    engine.train()
    for step in range(state.step, cfg.train.max_steps):
        r, n_no_grad, n_grad = sample_iterations(cfg.recurrence, step)
        lr = set_lr(engine, lr_at(step, cfg.optim, cfg.train.max_steps))
        step_batches = next(batches)
        hooks.on_batches(step, step_batches)
        telemetry.begin(step)
        result = stage.step(engine, step_batches, step, r=r, n_grad=n_grad, ctx=ctx, hooks=hooks)
        state.record(result, tokens_per_step)
        meter.record(state.step, result, r, n_no_grad, n_grad, lr, state)
        telemetry.end(state.step, tracker)

        if state.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
            code = stop(exitcodes.NONFINITE_ABORT, engine, ckpts, state, loader, ctx)
            break
        if due(cfg.eval.interval, state.step) and state.step < cfg.train.max_steps:
            run_validation(engine, ctx, dims, tracker, state.step)  # the last one: finish_run
        if due(cfg.checkpoint.interval, state.step):
            ckpts.save(engine, state, loader)
        if result.stop_requested:
            code = stop(exitcodes.REQUEUE, engine, ckpts, state, loader, ctx)
            break
        hooks.on_step_end(step)

    if code == exitcodes.OK:
        finish_run(engine, ctx, dims, tracker, ckpts, state, loader, trained=state.step > start)
    shut_down(ctx, tracker, hooks, loader, code, state.step)
    return code


def due(interval: int, step: int) -> bool:
    """Every `interval` optimizer steps (0: never)."""
    return interval > 0 and step % interval == 0


def stop(code: int, engine, ckpts, state, loader, ctx) -> int:
    """Checkpoint the current state before leaving the loop early, and say why."""
    ckpts.save(engine, state, loader)
    if code == exitcodes.REQUEUE:
        # a rank that got no signal itself stops because another did (all ranks agree)
        got = signal.Signals(ctx.stop.signum).name if ctx.stop.signum else "a peer's signal"
        log.warning(
            "stop signal received (%s): checkpointed step %d, exiting %d (requeue)",
            got,
            state.step,
            code,
        )
    else:
        log.error(
            "stopping: %d non-finite steps in a row (train.max_nonfinite_steps); the last good "
            "state is checkpointed at step %d; lower optim.lr or inspect the data before "
            "resuming (exit %d)",
            state.nonfinite_in_a_row,
            state.step,
            code,
        )
    return code


def finish_run(engine, ctx, dims, tracker, ckpts, state, loader, *, trained: bool) -> None:
    """Every step ran: final validation and checkpoint, then the COMPLETED marker (rank 0),
    which Slurm chains and `rdpt train --resume auto` read as "nothing left to do". A run
    resumed at train.max_steps trained nothing here and only makes sure the marker exists."""
    if not trained:
        log.info("run already complete: checkpoint at step %d = train.max_steps", state.step)
    else:
        if ctx.cfg.eval.interval:
            run_validation(engine, ctx, dims, tracker, state.step)
        ckpts.save(engine, state, loader)
    if ctx.is_main:
        marker = {
            "step": state.step,
            "tokens": state.tokens,
            "skipped_steps": state.skipped_steps,
            "wall_s": round(time.time() - ctx.started_at, 1),
            "finished_at": time.time(),
        }
        atomic_write_json(ctx.run_dir / "COMPLETED", marker)


def shut_down(ctx, tracker, hooks, loader, code: int, step: int) -> None:
    """Close the tracker (the MLflow run gets its status), record the exit, leave the groups."""
    hooks.close()
    loader.close()
    if tracker is not None:
        status = {exitcodes.OK: "FINISHED", exitcodes.REQUEUE: "KILLED"}.get(code, "FAILED")
        tracker.close(status=status)
    if ctx.is_main:
        exitcodes.write_exit(ctx.run_dir, code, step)
        ctx.lock.release()
    destroy_model_parallel()
