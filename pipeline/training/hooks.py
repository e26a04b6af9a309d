"""Observers and fault injection around the training loop, outside its hot path.

    main(cfg, hooks=MyHooks())                # tests install their own
    hooks = hooks_from_config(cfg.debug)      # or the `debug` section's knobs, for subprocesses

The loop calls each method at one fixed point; the base class does nothing. `FaultInjection`
implements the `debug` section (what the test suite needs from a real `rdpt train` process:
poisoned losses, a crash half-way through a checkpoint, a slow step, the sample ids seen).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path


class TrainHooks:
    """No-op hooks; subclass and override what you need."""

    def on_batches(self, step: int, batches) -> None:
        """Before optimizer step `step` (0-based) runs on `batches` (its micro-batches)."""

    def loss(self, step: int, loss):
        """The micro-batch loss of step `step` before backward; returns the loss to use."""
        return loss

    def in_checkpoint(self, step: int, phase: str, engine) -> None:
        """While checkpoint `step` is being written, at `phase`: "engine" (before DeepSpeed
        writes its files), "files" (every file written, none hashed), "renamed" (final name,
        `latest` not yet moved; rank 0 only)."""

    def on_step_end(self, step: int) -> None:
        """After optimizer step `step` (0-based) and its logging, validation, checkpoint."""

    def close(self) -> None:
        """The run ends (any exit path)."""


class FaultInjection(TrainHooks):
    """The `debug` section as hooks (see DebugSection for each knob)."""

    def __init__(self, debug, run_dir: Path, rank: int) -> None:
        self.debug = debug
        self.rank = rank
        self.samples = None
        if debug.record_sample_ids:
            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
            self.samples = open(run_dir / "logs" / f"samples-rank{rank}.jsonl", "a")

    def on_batches(self, step: int, batches) -> None:
        if self.samples is not None:
            ids = [int(i) for mb in batches for i in mb.sample_ids.tolist()]
            self.samples.write(json.dumps({"step": step, "ids": ids}) + "\n")
            self.samples.flush()

    def loss(self, step: int, loss):
        if step in self.debug.nan_at_steps:
            return loss * float("nan")  # poisons the loss and the gradients
        if step in self.debug.inf_loss_at_steps:
            return loss * float("inf")
        if step in self.debug.inf_grad_at_steps:
            return _InfGradient.apply(loss)
        return loss

    def in_checkpoint(self, step: int, phase: str, engine) -> None:
        for spec in self.debug.kill_in_checkpoint:
            at_step, at_phase, at_rank = spec.split(":")
            if (int(at_step), at_phase, int(at_rank)) != (step, phase, self.rank):
                continue
            if phase == "engine":  # die inside DeepSpeed's save, after its first file
                save = engine.checkpoint_engine.save

                def save_then_die(*args, save=save, **kwargs):
                    save(*args, **kwargs)
                    os.kill(os.getpid(), signal.SIGKILL)

                engine.checkpoint_engine.save = save_then_die
            else:
                os.kill(os.getpid(), signal.SIGKILL)

    def on_step_end(self, step: int) -> None:
        if self.debug.sleep_per_step_s:
            time.sleep(self.debug.sleep_per_step_s)

    def close(self) -> None:
        if self.samples is not None:
            self.samples.close()


def hooks_from_config(debug, run_dir: Path, rank: int) -> TrainHooks:
    """FaultInjection when any `debug` knob is set, else the no-op hooks."""
    if debug.model_dump() == type(debug)().model_dump():
        return TrainHooks()
    return FaultInjection(debug, run_dir, rank)


class _InfGradient:
    """Identity in the forward; +Inf gradients in the backward (a finite loss whose gradients
    overflow)."""

    @staticmethod
    def apply(x):
        import torch

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                return t.clone()

            @staticmethod
            def backward(ctx, grad):
                return grad * float("inf")

        return Fn.apply(x)
