"""Weights made elsewhere: a run, a training checkpoint, a consolidated export or a Hugging Face
Huginn directory, read into one form and loaded into a model of any TP size and ZeRO stage.

    weights = read_pretrained("exports/tiny")         # Pretrained(model_cfg, state_dict, ...)
    weights.check_matches(cfg.model)                   # RdptConfigError listing what differs
    load_pretrained(model, weights, zero_stage=3)      # every rank; after construction

`model.init_from` uses this to start a training run from trained weights (continued
pretraining, fine-tuning stages); evaluation reads the same sources.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.common.errors import RdptCheckpointError, RdptConfigError

# ModelConfig fields that say how a model runs or where it came from, not what its weights are
NOT_SHAPE = (
    "init_from",
    "init",  # how weights are initialised, not what they are
    "attention_backend",
    "loss_chunk_tokens",
    "state_init",
    "state_init_std",
    "state_init_scale",
)


@dataclass
class Pretrained:
    """Full (TP-unsharded) weights under consolidated names, with what is known about them."""

    model_cfg: Any  # ModelConfig
    state_dict: dict
    recurrence: dict | None  # {mean_recurrence, mean_backprop_depth} when recorded
    kind: str  # "checkpoint", "consolidated" or "hf"
    path: Path

    def check_matches(self, model_cfg, key: str = "model.init_from") -> None:
        """The weights fit a model of `model_cfg` (same shape), or RdptConfigError."""
        have = self.model_cfg.model_dump(exclude=set(NOT_SHAPE))
        want = model_cfg.model_dump(exclude=set(NOT_SHAPE))
        if want["exit_gate"] and not have["exit_gate"]:
            have["exit_gate"] = True  # a gate is added to weights without one (fresh init)
        diffs = [f"{k}: {have[k]!r} there, {want[k]!r} here" for k in want if have[k] != want[k]]
        if diffs:
            raise RdptConfigError(
                f"{key}: the weights at {self.path} ({self.kind}) do not fit this model: "
                + "; ".join(diffs)
            )


def source_kind(path: str | os.PathLike) -> str:
    """'checkpoint' (a run directory or one of its checkpoints), 'consolidated' or 'hf'."""
    from pipeline.model.consolidated import CONFIG, WEIGHTS
    from pipeline.training.checkpoint import is_complete

    p = Path(path)
    if is_complete(p) or (p / "checkpoints").is_dir():
        return "checkpoint"
    if (p / WEIGHTS).is_file() and (p / CONFIG).is_file():
        return "consolidated"
    if (p / "config.json").is_file():
        return "hf"
    raise RdptCheckpointError(
        f"{p}: not a run directory, a training checkpoint, a consolidated checkpoint "
        f"(model.safetensors + model.yaml) or a Hugging Face model directory (config.json)"
    )


def read_pretrained(path: str | os.PathLike) -> Pretrained:
    """Read the weights at `path` (see source_kind) into consolidated form, on the CPU."""
    p = Path(path)
    if not p.exists():
        raise RdptCheckpointError(f"{p}: does not exist")
    kind = source_kind(p)
    if kind == "checkpoint":
        from pipeline.training.checkpoint import (
            checkpoint_config,
            consolidated_state_dict,
            resolve_checkpoint,
        )

        ckpt = resolve_checkpoint(p)
        cfg = checkpoint_config(ckpt)
        trained = {
            "mean_recurrence": cfg.recurrence.mean,
            "mean_backprop_depth": cfg.recurrence.backprop_depth,
        }
        return Pretrained(cfg.model, consolidated_state_dict(ckpt, cfg.model), trained, kind, ckpt)
    if kind == "consolidated":
        from pipeline.model.consolidated import load_consolidated, read_recurrence

        model_cfg, sd = load_consolidated(p)
        return Pretrained(model_cfg, sd, read_recurrence(p), kind, p)
    from pipeline.model.hf_convert import (
        config_from_hf,
        hf_to_rdpt,
        read_hf_dir,
        recurrence_from_hf,
    )

    hf_cfg, hf_sd = read_hf_dir(p)
    model_cfg = config_from_hf(hf_cfg)
    return Pretrained(model_cfg, hf_to_rdpt(hf_sd, model_cfg), recurrence_from_hf(hf_cfg), kind, p)


def load_pretrained(model, weights: Pretrained, zero_stage: int = 0) -> None:
    """Copy `weights` into `model` (each TP rank takes its shard; under ZeRO-3 every partitioned
    parameter is gathered, written and re-partitioned). Call on every rank."""
    from pipeline.model.consolidated import load_full_state_dict

    gather = None
    if zero_stage == 3:
        import deepspeed

        def gather(p):
            return deepspeed.zero.GatheredParameters([p], modifier_rank=0)

    # weights of a model without an exit gate leave a gate model's gate at its fresh init
    fresh = ("exit_gate.",) if not weights.model_cfg.exit_gate else ()
    load_full_state_dict(model, weights.state_dict, gather=gather, may_miss=fresh)
