"""`rdpt export`: a training checkpoint (ZeRO 0-3, tp 1) -> full weights in a model format.

    export_checkpoint("runs/tiny", "exports/tiny")              # consolidated safetensors
    export_checkpoint("runs/tiny", "exports/tiny-hf", fmt="hf") # Hugging Face Huginn layout

The weights are gathered from DeepSpeed's files directly (the model is only built on the meta
device, for its parameter names); the output, with the checkpoint's tokenizer.json and the
training recurrence (r-bar, k), is written under a temporary name and renamed when complete.
`rdpt eval` / `rdpt generate` / the lm-eval adapter read both formats directly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pipeline.common.errors import RdptCheckpointError

FORMATS = ("safetensors", "hf")


def export_checkpoint(
    run_dir_or_ckpt: str | os.PathLike, out_dir: str | os.PathLike, fmt: str = "safetensors"
) -> Path:
    """Consolidated weights in rdpt's format (`safetensors`: model.safetensors + model.yaml) or
    the Hugging Face Huginn layout (`hf`)."""
    from pipeline.model.consolidated import write_consolidated
    from pipeline.model.hf_convert import convert_to_hf
    from pipeline.training.checkpoint import (
        checkpoint_config,
        consolidated_state_dict,
        resolve_checkpoint,
    )

    if fmt not in FORMATS:
        raise RdptCheckpointError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise RdptCheckpointError(f"{out_dir}: already exists (refusing to overwrite)")
    ckpt = resolve_checkpoint(run_dir_or_ckpt)
    cfg = checkpoint_config(ckpt)
    weights = consolidated_state_dict(ckpt, cfg.model)
    trained = {
        "mean_recurrence": cfg.recurrence.mean,
        "mean_backprop_depth": cfg.recurrence.backprop_depth,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        staged = Path(tmp) / "export"
        if fmt == "safetensors":
            write_consolidated(weights, cfg.model, staged, trained)
        else:
            write_consolidated(weights, cfg.model, Path(tmp) / "consolidated", trained)
            convert_to_hf(Path(tmp) / "consolidated", staged)
        # the tokenizer travels with the weights: evaluation and generation read it there
        if (ckpt / "tokenizer.json").is_file():
            shutil.copyfile(ckpt / "tokenizer.json", staged / "tokenizer.json")
        os.replace(staged, out_dir)  # complete, then in place
    return out_dir
