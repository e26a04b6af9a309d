"""The training loop of `rdpt train`, top to bottom (one process per rank).

    seed -> dims -> model -> DeepSpeed engine (ZeRO, AdamW) -> LR schedule -> data loader
    -> checkpoint (resume) -> tracker -> `for step in range(start, max_steps)`

Each optimizer step draws one r (pure function of seed and step: identical on every rank),
runs grad_accum micro-batches through the engine, and agrees across ranks, in a single
all-reduce, on the loss, on whether the step was finite and on whether a stop signal arrived.
Run as a worker: `python -m pipeline.train RUN_DIR/resolved.yaml --resume auto` (the launcher,
Slurm's srun or torchrun set RANK/WORLD_SIZE/...); `rdpt train` is the user-facing command.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import exitcodes
from pipeline.atomic import atomic_write_json, sha256_file
from pipeline.checkpoint import FILES_LIST, CheckpointManager, check_compatible
from pipeline.config import TrainConfig, load_train_config, parallel_dims
from pipeline.config_io import flatten, to_yaml
from pipeline.engine import (
    MegatronMpu,
    build_engine,
    construction_context,
    deepspeed_config,
    global_grad_norm,
    resolve_precision,
    set_lr,
)
from pipeline.launcher import write_exit
from pipeline.recurrence import sample_num_steps
from pipeline.schedules import lr_at
from pipeline.stop_signals import STOP_SIGNALS, record_early_signals
from pipeline.validation import grad_sq_norm_local, validate

log = logging.getLogger("rdpt.train")
H100_BF16_PEAK = 989e12


class StopFlag:
    """Set by SIGUSR1/SIGTERM; the loop finishes its step, all ranks agree, checkpoint, exit 85."""

    def __init__(self, early: list[int] | None = None) -> None:
        self.signum: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        if early:
            self.signum = early[0]

    def _handle(self, signum, frame) -> None:
        self.signum = signum


def setup_logging(run_dir: Path, rank: int) -> None:
    """Rank 0 logs rdpt.* at INFO to stdout and logs/train.log; everything else warnings only."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "logs" / "train.log"))
    logging.basicConfig(
        level=logging.WARNING,
        handlers=handlers,
        force=True,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("rdpt").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def exit_with_parent() -> None:
    """A worker started by `rdpt train` dies with its launcher (no orphans after kill -9)."""
    parent = int(os.environ.get("RDPT_LAUNCHER_PID", "0"))
    if not parent:
        return

    def watch() -> None:
        while True:
            try:
                os.kill(parent, 0)
            except OSError:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="rdpt-parent-watch").start()


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


def make_tracker(cfg: TrainConfig, run_dir: Path, world: int, tp: int, dp: int, ds_info):
    """Rank 0's RunTracker: params, tags and artifacts; a resumed run continues its MLflow run."""
    from pipeline.tracking.logger import RunTracker

    tracker = RunTracker(
        run_dir,
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
            "world_size": world,
            "tp": tp,
            "dp": dp,
            "zero_stage": cfg.parallel.zero_stage,
            "precision": resolve_precision(cfg),
            "dataset.manifest_sha256": ds_info.manifest_sha256,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
        }
    )
    tracker.log_artifact(run_dir / "resolved.yaml")
    tracker.log_artifact(Path(cfg.data.path) / "manifest.json", "dataset")
    return tracker


def _skipped_optimizer_step(*args, **kwargs) -> None:
    return None


def torch_optimizer_step(engine, cfg: TrainConfig) -> bool:
    """True when DeepSpeed steps a plain optimizer itself (ZeRO-0 without its bf16 wrapper),
    which has no overflow check of its own."""
    return cfg.parallel.zero_stage == 0 and isinstance(engine.optimizer, torch.optim.Optimizer)


def train_step(
    engine, batches, r: int, n_grad: int, step: int, cfg: TrainConfig, stop: StopFlag, device
) -> tuple[float, bool, bool, float]:
    """One optimizer step over grad_accum micro-batches.

    Returns (mean loss, non-finite, stop requested, grad norm), identical on every rank.
    """
    # NOTE: everything stays on the device until the one all-reduce per step (no host syncs
    # per micro-batch); that all-reduce is where the ranks agree on finite / stop.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    nan_injected = step in cfg.debug.nan_at_steps
    stats = None
    for i, mb in enumerate(batches):
        out = engine(
            mb.inputs.to(device),
            mb.targets.to(device),
            num_steps=r,
            backprop_depth=n_grad,
            state_init="random",
            state_seed=cfg.run.seed,
            sample_ids_B=mb.sample_ids,
        )
        loss = out.loss_BS.float().mean()
        if nan_injected:
            loss = loss * float("nan")  # testing: poisons the loss and the gradients
        engine.backward(loss)
        loss_sum += loss.detach().double()
        if i == len(batches) - 1:
            # NOTE: before the boundary step: every rank must agree whether to apply it.
            sq = (
                grad_sq_norm_local(engine, device)
                if cfg.parallel.zero_stage == 0
                else torch.zeros((), dtype=torch.float64, device=device)
            )
            bad = (~torch.isfinite(loss_sum) | ~torch.isfinite(sq)).double()
            stopping = torch.tensor(
                float(stop.signum is not None), dtype=torch.float64, device=device
            )
            stats = torch.stack([loss_sum, bad, stopping, sq])
            if dist.is_initialized():
                dist.all_reduce(stats)
            stats = stats.cpu()
        if i == len(batches) - 1 and stats[1] > 0 and torch_optimizer_step(engine, cfg):
            # ZeRO>=1 skips a non-finite step inside DeepSpeed; ZeRO-0 hands the optimizer
            # to torch, so this one step() runs without it (the engine still counts it).
            engine.optimizer.step = _skipped_optimizer_step
            try:
                engine.step()
            finally:
                del engine.optimizer.step
        else:
            engine.step()
    world = dist.get_world_size() if dist.is_initialized() else 1
    nonfinite = bool(stats[1] > 0) or not engine.was_step_applied()
    mean_loss = float(stats[0]) / (world * len(batches))
    if cfg.parallel.zero_stage == 0:
        dp = engine.dp_world_size
        grad_norm = math.sqrt(max(float(stats[3]) / dp, 0.0)) if not nonfinite else float("nan")
    else:
        grad_norm = global_grad_norm(engine)
    return mean_loss, nonfinite, bool(stats[2] > 0), grad_norm


def main(cfg: TrainConfig, resume: str = "auto", early_signals: list[int] | None = None) -> int:
    """Train `cfg` on the ranks given by the environment; return a process exit code.

    `early_signals`: from record_early_signals(), called as early as the caller could."""
    from launch.slurm_env import apply_slurm_env
    from pipeline.data import ResumableLoader, open_dataset
    from pipeline.distributed import init_process_group
    from pipeline.model import build_model
    from pipeline.parallel import destroy_parallel, initialize_parallel

    t_start = time.time()
    apply_slurm_env()
    init_process_group(export_env=True)  # DeepSpeed reads the rank variables
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = cfg.run_dir()
    setup_logging(run_dir, rank)
    exit_with_parent()
    stop = StopFlag(early_signals)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )

    # seed -> dims -> model -> engine
    torch.manual_seed(cfg.run.seed)
    tp, dp, grad_accum = parallel_dims(cfg, world)
    initialize_parallel(tp=tp, seed=cfg.run.seed)
    from megatron.core import parallel_state as ps

    dp_rank = ps.get_data_parallel_rank()
    with construction_context(cfg, dp, grad_accum):
        model = build_model(cfg.model, params_dtype=torch.float32)
    engine = build_engine(model, cfg, dp, grad_accum, mpu=MegatronMpu())
    if rank == 0:
        atomic_write_json(
            run_dir / "logs" / "deepspeed_config.json", deepspeed_config(cfg, dp, grad_accum)
        )

    # data
    ds_info = open_dataset(cfg.data.path)
    loader = ResumableLoader(
        cfg.data.path,
        split="train",
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum=grad_accum,
        dp_rank=dp_rank,
        dp_size=dp,
        seed=cfg.run.seed,
        shuffle=cfg.data.shuffle,
    )
    tokens_per_step = cfg.train.global_batch_size * ds_info.seq_len

    # checkpoint (resume)
    ckpts = CheckpointManager(run_dir, keep_last=cfg.checkpoint.keep_last)
    start, skipped_total, trained_tokens = 0, 0, 0
    ckpt = ckpts.find_resume(resume, verify=cfg.checkpoint.verify_on_load)
    if ckpt is not None:
        from pipeline.checkpoint import read_trainer_state

        check_compatible(
            read_trainer_state(ckpt),
            ckpt,
            manifest_sha256=ds_info.manifest_sha256,
            model_config=cfg.model.model_dump(mode="json"),
            tp=tp,
            dp=dp,
            zero_stage=cfg.parallel.zero_stage,
        )
        state = ckpts.load(engine, ckpt)
        loader.load_state_dict(state["loader"])
        start, skipped_total = state["step"], state.get("skipped_steps", 0)
        trained_tokens = state.get("tokens", start * tokens_per_step)
        log.info("resumed from %s (step %d)", ckpt, start)
    if start >= cfg.train.max_steps:
        log.info(
            "run already complete: checkpoint at step %d >= train.max_steps=%d",
            start,
            cfg.train.max_steps,
        )
        if rank == 0:
            write_exit(run_dir, exitcodes.OK, start)
        destroy_parallel()
        return exitcodes.OK

    tracker = make_tracker(cfg, run_dir, world, tp, dp, ds_info) if rank == 0 else None
    samples_log = None
    if cfg.debug.record_sample_ids:
        samples_log = open(run_dir / "logs" / f"samples-rank{rank}.jsonl", "a")

    def trainer_state(step: int) -> dict:
        return {
            "tokens": trained_tokens,
            "skipped_steps": skipped_total,
            "loader": loader.state_dict(),
            "manifest_sha256": ds_info.manifest_sha256,
            "data_path": str(cfg.data.path),
            "model_config": cfg.model.model_dump(mode="json"),
            "parallel": {"tp": tp, "dp": dp, "zero_stage": cfg.parallel.zero_stage},
            "lr": lr_at(step, cfg.optim, cfg.train.max_steps),
            "time": time.time(),
        }

    def save(step: int) -> Path:
        crash = None
        if cfg.debug.crash_in_checkpoint_at_step == step:

            def crash() -> None:
                os._exit(1)

        path = ckpts.save(
            engine,
            step,
            trainer_state(step),
            config_yaml=to_yaml(cfg),
            tokenizer_path=ds_info.tokenizer_path,
            crash_hook=crash,
        )
        if tracker is not None:
            # the digest of the file list, which holds every file's sha256: one value that
            # identifies the whole checkpoint (the tracker measures its size)
            tracker.log_checkpoint_reference(path, step, sha256=sha256_file(path / FILES_LIST))
        log.info("checkpoint %s", path)
        return path

    # the loop
    code, in_a_row, last_saved = exitcodes.OK, 0, start
    t_log, tokens_since_log = time.perf_counter(), 0
    data_iter = iter(loader)
    engine.train()
    step = start
    for step in range(start, cfg.train.max_steps):
        r, n_no_grad, n_grad = sample_num_steps(cfg.recurrence, step)
        lr = lr_at(step, cfg.optim, cfg.train.max_steps)
        set_lr(engine, lr)
        batches = next(data_iter)
        if samples_log is not None:
            ids = [int(i) for mb in batches for i in mb.sample_ids.tolist()]
            samples_log.write(json.dumps({"step": step, "ids": ids}) + "\n")
            samples_log.flush()
        loss, nonfinite, stop_requested, grad_norm = train_step(
            engine, batches, r, n_grad, step, cfg, stop, device
        )
        done = step + 1
        trained_tokens += tokens_per_step
        tokens_since_log += tokens_per_step
        in_a_row = in_a_row + 1 if nonfinite else 0
        skipped_total += int(nonfinite)
        if nonfinite:
            log.warning(
                "step %d: non-finite loss/gradient (loss %s, grad norm %s): skipped "
                "(%d in a row, %d in total)",
                step,
                loss,
                grad_norm,
                in_a_row,
                skipped_total,
            )

        if tracker is not None and (done % cfg.train.log_interval == 0 or nonfinite):
            elapsed = time.perf_counter() - t_log
            tok_s = tokens_since_log / max(elapsed, 1e-9)
            metrics = {
                "train/loss": loss,
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/tokens": trained_tokens,
                "train/tokens_per_s": tok_s,
                "train/r": r,
                "train/r_no_grad": n_no_grad,
                "train/r_grad": n_grad,
                "train/skipped_steps": skipped_total,
            }
            if torch.cuda.is_available():
                from pipeline.model.flops import flops_per_token

                fpt = flops_per_token(cfg.model, r, n_grad, ds_info.seq_len)
                metrics["train/mfu"] = fpt * tok_s / (H100_BF16_PEAK * world)
            tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, done)
            log.info(
                "step %d/%d loss %.4f lr %.3g gnorm %.3f r %d (%d+%d) tok/s %.0f",
                done,
                cfg.train.max_steps,
                loss,
                lr,
                grad_norm,
                r,
                n_no_grad,
                n_grad,
                tok_s,
            )
            t_log, tokens_since_log = time.perf_counter(), 0

        if in_a_row >= cfg.train.max_nonfinite_steps:
            log.error(
                "stopping: %d non-finite steps in a row (train.max_nonfinite_steps=%d); "
                "the last good state is checkpointed at step %d; lower optim.lr or inspect "
                "the data before resuming",
                in_a_row,
                cfg.train.max_nonfinite_steps,
                done,
            )
            save(done)
            last_saved, code = done, exitcodes.NONFINITE_ABORT
            break
        if cfg.eval.interval and done % cfg.eval.interval == 0 and done < cfg.train.max_steps:
            run_validation(engine, cfg, tracker, done, dp_rank, dp, device)
        if done % cfg.checkpoint.interval == 0:
            save(done)
            last_saved = done
        if stop_requested:
            if last_saved != done:
                save(done)
                last_saved = done
            log.warning(
                "stop signal received: checkpointed step %d, exiting %d (requeue)",
                done,
                exitcodes.REQUEUE,
            )
            code = exitcodes.REQUEUE
            break
        if cfg.debug.sleep_per_step_s:
            time.sleep(cfg.debug.sleep_per_step_s)
    else:
        done = cfg.train.max_steps
        if cfg.eval.interval:
            run_validation(engine, cfg, tracker, done, dp_rank, dp, device)
        if last_saved != done:
            save(done)
        if rank == 0:
            atomic_write_json(
                run_dir / "COMPLETED",
                {
                    "step": done,
                    "tokens": trained_tokens,
                    "skipped_steps": skipped_total,
                    "wall_s": round(time.time() - t_start, 1),
                    "finished_at": time.time(),
                },
            )

    if samples_log is not None:
        samples_log.close()
    if tracker is not None:
        status = {exitcodes.OK: "FINISHED", exitcodes.REQUEUE: "KILLED"}.get(code, "FAILED")
        tracker.close(status=status)
    if rank == 0:
        write_exit(run_dir, code, step + 1)
    destroy_parallel()
    return code


def run_validation(engine, cfg, tracker, step, dp_rank, dp, device) -> None:
    results = validate(engine, cfg, dp_rank, dp, device)
    if tracker is not None:
        tracker.log_metrics(results, step)
        log.info(
            "validation at step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in results.items())
        )


def worker_main(argv: list[str] | None = None) -> int:
    early, _ = record_early_signals()
    parser = argparse.ArgumentParser(description="rdpt training worker (one rank)")
    parser.add_argument("config", help="resolved TrainConfig YAML (written by `rdpt train`)")
    parser.add_argument("--resume", default="auto")
    args = parser.parse_args(argv)
    return main(load_train_config(args.config), resume=args.resume, early_signals=early)


if __name__ == "__main__":
    sys.exit(worker_main())
