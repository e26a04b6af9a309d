"""Validation during training and small numeric helpers of the training step.

    run_validation(engine, ctx, dims, tracker, step)     # logs them (rank 0)
    metrics = validate(engine, cfg, dp_rank, dp, device)
    # {"val/loss_r1": ..., "val/loss_r4": ..., "val/state_cosine": ..., "val/rel_change_last": ...}

Validation runs the same fixed set of validation sequences (the first eval.max_sequences of the
val split, split over data-parallel ranks) at each r in eval.recurrences, with the initial
state seeded per sample id (deterministic), and reports the representation-collapse telemetry
(mean pairwise cosine of the final token states) at the largest r.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

log = logging.getLogger("rdpt.train")
VAL_STATE_SEED = 20250207


def _dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


def _val_batches(cfg, dp_rank: int, dp: int) -> list:
    from pipeline.data.loader import iterate_sequences

    per_rank = max(1, cfg.eval.max_sequences // dp)
    batches = list(
        iterate_sequences(
            cfg.data.path,
            split="val",
            batch_size=cfg.eval.batch_size,
            dp_rank=dp_rank,
            dp_size=dp,
            max_sequences=per_rank * dp,
        )
    )
    # NOTE: every DP rank must run the same number of forwards (ZeRO-3 gathers parameters
    # collectively inside each forward), so all ranks truncate to the smallest count.
    if dist.is_initialized():
        n = torch.tensor([len(batches)], dtype=torch.int64)
        dist.all_reduce(n, op=dist.ReduceOp.MIN, group=_dp_group())
        batches = batches[: int(n.item())]
    return batches


@torch.no_grad()
def validate(engine, cfg, dp_rank: int, dp: int, device) -> dict[str, float]:
    """val/loss_r{R} for R in cfg.eval.recurrences, val/state_cosine and val/rel_change_last."""
    batches = _val_batches(cfg, dp_rank, dp)
    was_training = engine.training
    engine.eval()
    out: dict[str, float] = {}
    r_tele = max(cfg.eval.recurrences)
    for r in cfg.eval.recurrences:
        acc = torch.zeros(4, dtype=torch.float64)  # loss sum, tokens, cosine sum, change sum
        for inputs, targets, sample_ids in batches:
            res = engine(
                inputs.to(device),
                targets.to(device),
                r=r,
                backprop_depth=None,
                state_init="random",
                state_seed=VAL_STATE_SEED,
                sample_ids_B=sample_ids.to(device),
                telemetry=(r == r_tele),
            )
            acc[0] += res.loss_BS.double().sum().cpu()
            acc[1] += res.loss_BS.numel()
            if res.telemetry is not None:
                acc[2] += float(res.telemetry["state_cosine"])
                acc[3] += float(res.telemetry["rel_change"][-1])
        n_batches = torch.tensor([float(len(batches))], dtype=torch.float64)
        if dist.is_initialized():
            acc, n_batches = acc.to(device), n_batches.to(device)
            dist.all_reduce(acc, group=_dp_group())
            dist.all_reduce(n_batches, group=_dp_group())
            acc, n_batches = acc.cpu(), n_batches.cpu()
        out[f"val/loss_r{r}"] = float(acc[0] / max(acc[1].item(), 1.0))
        if r == r_tele and n_batches.item() > 0:
            out["val/state_cosine"] = float(acc[2] / n_batches)
            out["val/rel_change_last"] = float(acc[3] / n_batches)
    if was_training:
        engine.train()
    return {k: v for k, v in out.items() if math.isfinite(v)}


def run_validation(engine, ctx, dims, tracker, step: int) -> dict[str, float]:
    """validate() on every rank; rank 0 logs the metrics at `step`."""
    results = validate(engine, ctx.cfg, dims.dp_rank(), dims.dp, ctx.device)
    if tracker is not None:
        tracker.log_metrics(results, step)
        log.info(
            "validation at step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in results.items())
        )
    return results
