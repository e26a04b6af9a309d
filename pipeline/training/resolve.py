"""Where a training config meets the world size and the dataset: one function, used by
`rdpt train` and `rdpt submit` before any process starts.

    cfg = load_train_config("configs/train/tiny.yaml", overrides)
    cfg, dims = resolve(cfg, world_size=2)   # what the ranks will run; resolved.yaml is this
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.common.errors import RdptConfigError
from pipeline.tracking.credentials import take_credentials
from pipeline.training.config import TrainConfig
from pipeline.training.layout import ParallelDims


def resolve(cfg: TrainConfig, world_size: int) -> tuple[TrainConfig, ParallelDims]:
    """The config exactly as `world_size` ranks will run it, and its parallel layout.

    Fills what the launch decides: run.dir and data.path made absolute (the job may run in
    another directory), model.vocab_size from the dataset manifest (rounded up to a multiple of
    parallel.tp), parallel.nproc = world size. Checks every rule that needs the world size or
    the dataset (RdptConfigError naming the key). `cfg` itself is left unchanged.
    """
    cfg = cfg.model_copy(deep=True)
    cfg.run.dir = str(cfg.run_dir().resolve())
    # credentials in tracking.uri move to MLflow's auth variables: never into resolved.yaml
    cfg.tracking.uri = take_credentials(cfg.tracking.uri)
    cfg.data.path = str(Path(cfg.data.path).resolve())
    manifest = read_manifest(cfg)
    if manifest.get("vocab_size"):
        tp = cfg.parallel.tp
        cfg.model.vocab_size = -(-int(manifest["vocab_size"]) // tp) * tp
    if cfg.model.init_from:
        check_init_from(cfg)
    cfg.parallel.nproc = world_size
    dims = ParallelDims.from_config(cfg, world_size)
    check_dataset(cfg, manifest)
    return cfg, dims


def check_init_from(cfg: TrainConfig) -> None:
    """model.init_from names weights that exist and fit the model (made absolute)."""
    from pipeline.training.pretrained import read_pretrained

    path = Path(cfg.model.init_from).resolve()
    if not path.exists():
        raise RdptConfigError(f"model.init_from: {path} does not exist")
    cfg.model.init_from = str(path)
    read_pretrained(path).check_matches(cfg.model)


def read_manifest(cfg: TrainConfig) -> dict:
    """The dataset's manifest.json, or RdptConfigError saying why data.path is no dataset."""
    data = Path(cfg.data.path)
    if not data.is_dir():
        raise RdptConfigError(
            f"data.path: dataset directory '{data}' does not exist "
            f"(prepare one with `rdpt prep`, or set data.path=...)"
        )
    manifest_path = data / "manifest.json"
    if not manifest_path.is_file():
        raise RdptConfigError(
            f"data.path: '{data}' has no manifest.json (not a dataset written by `rdpt prep`)"
        )
    try:
        return json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RdptConfigError(f"data.path: cannot read {manifest_path}: {e}") from None


def check_dataset(cfg: TrainConfig, manifest: dict) -> None:
    """The dataset fits the model and the evaluation settings."""
    manifest_path = Path(cfg.data.path) / "manifest.json"
    splits = manifest.get("splits", {})
    if cfg.train.stage in ("task", "coconut") and manifest.get("kind") != "task":
        raise RdptConfigError(
            f"train.stage={cfg.train.stage} needs a task dataset (rdpt prep --task); "
            f"{manifest_path} is a pretraining dataset"
        )
    if cfg.train.stage == "coconut":
        check_coconut(cfg, manifest, manifest_path)
    if cfg.train.stage == "exit_gate":
        check_exit_gate(cfg)
    task_data = cfg.train.stage in ("task", "coconut") or (
        cfg.train.stage == "exit_gate" and manifest.get("kind") == "task"
    )
    if not task_data and (cfg.data.pause.count or cfg.data.reasoning_steps != "keep"):
        raise RdptConfigError(
            f"data.pause / data.reasoning_steps apply to task datasets under train.stage task, "
            f"coconut or exit_gate, not {cfg.train.stage} on {manifest_path}"
        )
    if not splits.get("train", {}).get("shards"):
        raise RdptConfigError(f"data.path: {manifest_path} lists no train shards")
    vocab = manifest.get("vocab_size")
    model_vocab = getattr(cfg.model, "vocab_size", None)
    if vocab is not None and model_vocab is not None and vocab > model_vocab:
        raise RdptConfigError(
            f"model.vocab_size={model_vocab} is smaller than the dataset's vocab_size={vocab} "
            f"({manifest_path})"
        )
    seq_len = manifest.get("seq_len")
    model_len = getattr(cfg.model, "max_seq_len", None)
    if seq_len is not None and model_len is not None and seq_len > model_len:
        raise RdptConfigError(
            f"model.max_seq_len={model_len} is shorter than the dataset's seq_len={seq_len} "
            f"({manifest_path})"
        )
    if cfg.eval.interval > 0 and not splits.get("val", {}).get("shards"):
        raise RdptConfigError(
            f"eval.interval={cfg.eval.interval} but {manifest_path} lists no val shards "
            f"(set eval.interval=0 to train without validation)"
        )


def refuse_zero3(cfg: TrainConfig, how: str) -> None:
    """A stage that calls the model `how` outside the engine's forward cannot run under ZeRO-3."""
    if cfg.parallel.zero_stage == 3:
        raise RdptConfigError(
            f"train.stage={cfg.train.stage} runs the model {how} outside the engine's forward, "
            "which ZeRO-3 needs to gather parameters: use parallel.zero_stage 0, 1 or 2"
        )


def check_exit_gate(cfg: TrainConfig) -> None:
    """The gate stage has a gate to fit, a trained model to fit it on, a fixed horizon of
    iterations and a layout where the model may be called outside the engine's forward."""
    if not cfg.model.exit_gate:
        raise RdptConfigError(
            "train.stage=exit_gate fits the model's exit gate: set model.exit_gate=true"
        )
    if not cfg.model.init_from:
        raise RdptConfigError(
            "train.stage=exit_gate fits a gate on a trained, frozen model: set "
            "model.init_from=RUN_OR_CHECKPOINT (a run directory, a checkpoint or an export)"
        )
    rec = cfg.recurrence
    if rec.mode != "fixed" or rec.fixed < 2:
        raise RdptConfigError(
            "train.stage=exit_gate learns where to stop within a fixed number of iterations: "
            "set recurrence.mode=fixed and recurrence.fixed=R with R >= 2 (e.g. the largest r "
            f"you will decode with); got mode={rec.mode}, fixed={rec.fixed}"
        )
    refuse_zero3(cfg, "piece by piece")


def check_coconut(cfg: TrainConfig, manifest: dict, manifest_path) -> None:
    """The curriculum fits the data and the DeepSpeed layout."""
    levels = [int(d) for d in manifest["splits"]["train"].get("difficulty", {})]
    most = max(levels, default=0)
    if cfg.coconut.max_stages > most:
        raise RdptConfigError(
            f"coconut.max_stages={cfg.coconut.max_stages}: stage k replaces the first k "
            f"reasoning steps, but the examples of {manifest_path} have at most {most} steps"
        )
    refuse_zero3(cfg, "pass by pass")
    if cfg.data.pause.count or cfg.data.reasoning_steps != "keep":
        raise RdptConfigError(
            "train.stage=coconut replaces the reasoning steps itself: leave data.pause.count=0 "
            "and data.reasoning_steps=keep"
        )
