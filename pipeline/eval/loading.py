"""Resolve what the user names on the command line (a run directory, a checkpoint directory, a
consolidated export, a Hugging Face Huginn directory or an MLflow run id) and load the model,
its tokenizer and its dataset for evaluation.

    model, cfg, data, meta = load_for_inference("runs/tiny")        # model in eval mode
    loaded = load_model_and_tokenizer("runs/tiny")                  # + tokenizer, eot id, ...
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.common.errors import RdptCheckpointError


def load_for_inference(
    run_dir_or_ckpt: str | os.PathLike, *, device: str = "cpu", dtype=None
) -> tuple[Any, Any, Any, dict]:
    """(model, TrainConfig, DatasetInfo or tokenizer path, meta{step, tokens, checkpoint, ...}).

    Builds the model at tensor-parallel size 1 (initialising a world-size-1 process group and
    megatron parallel_state when none exists) and loads the checkpoint's consolidated weights.
    """
    import torch

    from pipeline.model import build_model
    from pipeline.model.consolidated import load_full_state_dict
    from pipeline.model.runtime import init_model_parallel
    from pipeline.training.checkpoint import (
        checkpoint_config,
        consolidated_state_dict,
        read_trainer_state,
        resolve_checkpoint,
    )
    from pipeline.training.pretrained import source_kind

    try:
        kind = source_kind(run_dir_or_ckpt)
    except RdptCheckpointError:
        kind = "checkpoint"  # resolve_checkpoint says what is wrong with it
    if kind != "checkpoint":
        return _load_exported(Path(run_dir_or_ckpt), device=device, dtype=dtype)
    ckpt = resolve_checkpoint(run_dir_or_ckpt)
    cfg = checkpoint_config(ckpt)
    state = read_trainer_state(ckpt)
    init_model_parallel(tp=1)
    model = build_model(cfg.model, params_dtype=torch.float32)
    load_full_state_dict(model, consolidated_state_dict(ckpt, cfg.model))
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    data: Any
    try:
        from pipeline.data.loader import open_dataset

        data = open_dataset(cfg.data.path)
        if data.manifest_sha256 != state.get("manifest_sha256"):
            raise ValueError("dataset changed")
    except Exception:  # noqa: BLE001  dataset moved or changed: the checkpoint's own tokenizer
        data = str(ckpt / "tokenizer.json")
    meta = {k: state.get(k) for k in ("step", "tokens", "skipped_steps", "manifest_sha256")}
    meta["checkpoint"] = str(ckpt)
    return model, cfg, data, meta


def _load_exported(path: Path, *, device: str, dtype) -> tuple[Any, Any, Any, dict]:
    """load_for_inference of a consolidated export or an HF Huginn directory: the weights, a
    TrainConfig holding the model and the recurrence it was trained with (r-bar, k: the default
    r of evaluation and generation), and the directory's tokenizer.json when it has one."""
    import torch

    from pipeline.model import build_model
    from pipeline.model.consolidated import load_full_state_dict
    from pipeline.model.runtime import init_model_parallel
    from pipeline.training.config import TrainConfig
    from pipeline.training.pretrained import read_pretrained

    weights = read_pretrained(path)
    model_cfg = weights.model_cfg.model_copy(update={"init_from": None})
    trained = weights.recurrence or {}
    recurrence = {}
    if "mean_recurrence" in trained:
        recurrence["mean"] = float(trained["mean_recurrence"])
    if "mean_backprop_depth" in trained:
        recurrence["backprop_depth"] = int(trained["mean_backprop_depth"])
    cfg = TrainConfig(model=model_cfg, recurrence=recurrence, data={"path": str(path)})
    init_model_parallel(tp=1)
    model = build_model(cfg.model, params_dtype=torch.float32)
    load_full_state_dict(model, weights.state_dict)
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    meta = {"step": None, "tokens": None, "checkpoint": str(path), "source": weights.kind}
    meta["mean_recurrence"] = trained.get("mean_recurrence")
    return model, cfg, str(path / "tokenizer.json"), meta


def default_r(loaded: Loaded) -> int:
    """The r evaluation and generation use when none is given: the r-bar the model was trained
    with (recorded in checkpoints and exports), rounded; 32 when unknown."""
    return max(1, round(float(loaded.cfg.recurrence.mean)))


@dataclass
class Loaded:
    """A model ready for evaluation and everything around it."""

    model: Any
    cfg: Any  # TrainConfig
    tokenizer: Any  # tokenizers.Tokenizer or None
    tokenizer_path: Path | None
    data_path: Path | None  # the training dataset (validation shards), if known and present
    eot_id: int
    max_length: int
    meta: dict
    run_dir: Path | None  # the run directory (mlflow_run.json, eval outputs), if known


def run_dir_of(path: Path) -> Path | None:
    """The run directory of a run dir or of a checkpoint inside runs/<name>/checkpoints/."""
    path = path.resolve()
    if (path / "checkpoints").is_dir() or (path / "resolved.yaml").is_file():
        return path
    if path.parent.name == "checkpoints":
        return path.parent.parent
    return None


def _run_dir_from_mlflow(run_id: str, tracking_uri: str) -> Path:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise RdptCheckpointError(
            f"{run_id!r} is neither a checkpoint / run directory nor a run id known to the "
            f"MLflow server at {tracking_uri} ({str(e).splitlines()[0]})"
        ) from None
    tags, params = run.data.tags, run.data.params
    for value in (tags.get("rdpt.run_dir"), params.get("run.dir")):
        if value and Path(value).is_dir():
            return Path(value)
    name = params.get("run.name") or tags.get("mlflow.runName")
    if name and (Path("runs") / name).is_dir():
        return Path("runs") / name
    raise RdptCheckpointError(
        f"MLflow run {run_id} exists but its run directory is not on this machine "
        f"(tag rdpt.run_dir={tags.get('rdpt.run_dir')!r}, param run.dir={params.get('run.dir')!r})"
    )


def resolve_target(target: str, tracking_uri: str | None = None) -> Path:
    """A path to a run or checkpoint directory from a path or an MLflow run id."""
    path = Path(target)
    if path.exists():
        return path
    from pipeline.tracking.credentials import take_credentials

    uri = take_credentials(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    looks_like_id = len(target) >= 8 and all(c in "0123456789abcdef" for c in target.lower())
    if uri and looks_like_id:
        return _run_dir_from_mlflow(target, uri)
    hint = "" if uri else "; to name an MLflow run id, set --tracking-uri or MLFLOW_TRACKING_URI"
    raise RdptCheckpointError(f"no checkpoint or run directory at {target!r}{hint}")


def load_model_and_tokenizer(
    target: str, tracking_uri: str | None = None, device: str | None = None
) -> Loaded:
    """Load a checkpoint (load_for_inference) with its tokenizer."""
    import torch

    path = resolve_target(target, tracking_uri)
    # NOTE: DeepSpeed's ZeRO consolidation prints progress on stdout; keep stdout for results.
    with contextlib.redirect_stdout(sys.stderr):
        model, cfg, data_info, meta = load_for_inference(str(path))
    if device:
        model = model.to(torch.device(device))
    tok_path: Path | None = None
    eot_id: int | None = None
    if data_info is not None and not isinstance(data_info, (str, os.PathLike)):
        tok_path = Path(data_info.tokenizer_path) if data_info.tokenizer_path else None
        eot_id = int(data_info.eot_id)
    elif data_info is not None:
        tok_path = Path(data_info)
    ckpt_dir = Path(meta.get("checkpoint", path)) if meta else path
    if (tok_path is None or not tok_path.is_file()) and (ckpt_dir / "tokenizer.json").is_file():
        tok_path = ckpt_dir / "tokenizer.json"
    data_path = Path(cfg.data.path) if (Path(cfg.data.path) / "manifest.json").is_file() else None
    if eot_id is None and data_path is not None:
        eot_id = json.loads((data_path / "manifest.json").read_text()).get("eot_id")
    tokenizer = None
    if tok_path is not None and tok_path.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tok_path))
        for name in ("<|endoftext|>", "<|end_text|>"):  # rdpt's default, Huginn's
            if eot_id is None:
                eot_id = tokenizer.token_to_id(name)
        if eot_id is None:
            if eot_id is None:
                specials = [i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special]
                eot_id = min(specials) if specials else None
    return Loaded(
        model=model,
        cfg=cfg,
        tokenizer=tokenizer,
        tokenizer_path=tok_path,
        data_path=data_path,
        eot_id=int(eot_id or 0),
        max_length=int(cfg.model.max_seq_len),
        meta=dict(meta or {}),
        run_dir=run_dir_of(path),
    )
