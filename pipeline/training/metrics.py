"""What the training loop reports: MLflow run set-up and per-step metrics (rank 0 only).

    tracker = open_tracker(ctx, dims, dataset)          # None on ranks other than 0
    meter = StepMeter(cfg, seq_len, world, tracker)
    meter.record(step_done, result, r, n_no_grad, n_grad, lr, state)   # logs when due

Metrics (metrics.jsonl and MLflow): train/loss, train/lr, train/grad_norm, train/tokens,
train/tokens_per_s, train/model_tflops (model TFLOP/s per device), train/r, train/r_no_grad,
train/r_grad, train/skipped_steps and, where the device's peak is known (the table in
pipeline/common/mfu.py, or train.peak_tflops), train/mfu. Throughput, TFLOP/s and MFU are
measured over the steps since the last log line, each step's FLOPs counted with its own r
(r varies from step to step: the interval's FLOPs are a sum, never last r x throughput).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import time
from pathlib import Path

import torch

log = logging.getLogger("rdpt.train")


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def open_tracker(ctx, dims, dataset):
    """Rank 0's RunTracker: params, tags and artifacts; a resumed run continues its MLflow run."""
    if not ctx.is_main:
        return None
    from pipeline.common.config_io import flatten
    from pipeline.tracking.logger import RunTracker
    from pipeline.training.engine import resolve_precision

    cfg = ctx.cfg
    tracker = RunTracker(
        ctx.run_dir,
        cfg.tracking.uri,
        cfg.tracking.experiment,
        cfg.run.name,
        enabled=cfg.tracking.enabled,
        checkpoint_artifact_max_bytes=int(cfg.tracking.artifact_max_mb * 2**20),
    )
    tracker.ensure_run()
    tracker.log_params(flatten(cfg))
    tracker.set_tags(
        {
            "git_commit": git_commit(),
            "hostname": socket.gethostname(),
            "world_size": ctx.world,
            "tp": dims.tp,
            "dp": dims.dp,
            "zero_stage": cfg.parallel.zero_stage,
            "precision": resolve_precision(cfg),
            "device_name": device_name(),
            "peak_tflops": _peak_tag(cfg),
            "dataset.manifest_sha256": dataset.manifest_sha256,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
        }
    )
    tracker.log_artifact(ctx.run_dir / "resolved.yaml")
    tracker.log_artifact(Path(cfg.data.path) / "manifest.json", "dataset")
    return tracker


def device_name() -> str:
    """torch's name of this process's accelerator ('cpu' without one)."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def run_peak_flops(cfg, name: str | None = None) -> float | None:
    """Peak FLOP/s per device for this run: train.peak_tflops, else the table by device name
    (None on CPU and on devices the table lacks)."""
    from pipeline.common.mfu import peak_flops

    name = device_name() if name is None else name
    return peak_flops(None if name == "cpu" else name, cfg.train.peak_tflops)


def _peak_tag(cfg) -> str:
    peak = run_peak_flops(cfg)
    return "" if peak is None else f"{peak / 1e12:g}"


class StepMeter:
    """Throughput, MFU and the log line of each logged step (rank 0 logs; others only count).

    `clock` (default time.perf_counter) and `peak` (default run_peak_flops(cfg)) can be given,
    which is how the tests replay a recorded run exactly."""

    def __init__(self, cfg, seq_len: int, world: int, tracker, *, clock=None, peak=None) -> None:
        self.cfg, self.seq_len, self.world, self.tracker = cfg, seq_len, world, tracker
        self.clock = clock or time.perf_counter
        self.peak = peak if peak is not None else run_peak_flops(cfg)
        self.tokens_per_step = cfg.train.global_batch_size * seq_len
        self._started, self._steps = self.clock(), 0
        self._t0 = self.clock()
        self._tokens = 0
        self._flops = 0.0

    def record(self, done: int, result, r: int, n_no_grad: int, n_grad: int, lr: float, state):
        """Count optimizer step `done` (1-based); log it when due (or when it was skipped)."""
        from pipeline.model.flops import flops_per_token

        self._tokens += self.tokens_per_step
        self._steps += 1
        fpt = flops_per_token(self.cfg.model, r, n_grad, self.seq_len)
        self._flops += fpt * self.tokens_per_step
        if result.nonfinite:
            log.warning(
                "step %d: non-finite loss/gradient (loss %s, grad norm %s): skipped "
                "(%d in a row, %d in total)",
                done - 1,
                result.loss,
                result.grad_norm,
                state.nonfinite_in_a_row,
                state.skipped_steps,
            )
        if self.tracker is None or not (
            done % self.cfg.train.log_interval == 0 or result.nonfinite
        ):
            return
        from pipeline.common.mfu import mfu

        elapsed = max(self.clock() - self._t0, 1e-9)
        tok_s = self._tokens / elapsed
        metrics = {
            "train/loss": result.loss,
            "train/lr": lr,
            "train/grad_norm": result.grad_norm,
            "train/tokens": state.tokens,
            "train/tokens_per_s": tok_s,
            "train/model_tflops": self._flops / elapsed / self.world / 1e12,
            "train/r": r,
            "train/r_no_grad": n_no_grad,
            "train/r_grad": n_grad,
            "train/skipped_steps": state.skipped_steps,
        }
        if self.peak is not None:
            metrics["train/mfu"] = mfu(self._flops, elapsed, self.world, self.peak)
        self.tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, done)
        per_step = (self.clock() - self._started) / self._steps
        eta = time.strftime("%H:%M:%S", time.gmtime(per_step * (self.cfg.train.max_steps - done)))
        log.info(
            "step %d/%d loss %.4f lr %.3g gnorm %.3f r %d (%d+%d) tok/s %.0f eta %s",
            done,
            self.cfg.train.max_steps,
            result.loss,
            lr,
            result.grad_norm,
            r,
            n_no_grad,
            n_grad,
            tok_s,
            eta,
        )
        self._t0, self._tokens, self._flops = self.clock(), 0, 0.0
