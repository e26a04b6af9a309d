"""Checkpoints of a training run: crash-safe, verified, self-describing, resumable.

Layout (one directory per checkpoint, under <run_dir>/checkpoints/):

    step-00000100/
      ds/...                  DeepSpeed's sharded engine state (model, optimizer, ZeRO partitions)
      rng/rank-00000.pt       torch RNG states of each rank (tensors only: weights_only loadable)
      trainer_state.json      step, tokens, skipped steps, loader state, manifest sha256,
                              parallel layout, model config (what a resume must agree with)
      config.yaml             the resolved TrainConfig of the run
      tokenizer.json          copy of the dataset's tokenizer (the checkpoint is self-contained)
      files.sha256.json       {relative path: {sha256, bytes}} of every file above: written last
    latest                    text file naming the newest complete checkpoint: written after it

A checkpoint is built under `.tmp-step-...` and renamed when complete, so a crash while saving
leaves the previous one untouched. On load every file's sha256 is checked (striped over ranks);
a corrupted checkpoint is refused by name and `--resume auto` falls back to the previous one.

Reading one for use elsewhere: `resolve_checkpoint(run_dir_or_ckpt)`, `checkpoint_config(ckpt)`
and `consolidated_state_dict(ckpt)` (full weights from DeepSpeed's files). Evaluation loads a
model with pipeline/eval/loading.py, `rdpt export` writes model formats with export.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.common.atomic import atomic_write_json, atomic_write_text, fsync_dir, sha256_file
from pipeline.common.errors import RdptCheckpointError, is_disk_full, is_short_write

log = logging.getLogger("rdpt.checkpoint")

# Non-tensor objects DeepSpeed pickles into its checkpoint files (ZeRO 0-3, fp32/bf16/fp16).
# Loading allows exactly these on top of torch's weights_only defaults: no arbitrary unpickling.
_DEEPSPEED_SAFE_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)

STEP_RE = re.compile(r"^step-(\d{8})$")
FILES_LIST = "files.sha256.json"
TRAINER_STATE = "trainer_state.json"
DS_TAG = "ds"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


def _all_gather_object(obj: Any) -> list[Any]:
    d = _dist()
    if d is None:
        return [obj]
    out: list[Any] = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def _rank_world() -> tuple[int, int]:
    d = _dist()
    return (d.get_rank(), d.get_world_size()) if d is not None else (0, 1)


def _checkpoint_files(ckpt: Path) -> list[str]:
    return sorted(
        str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != FILES_LIST
    )


def _hash_striped(ckpt: Path, files: list[str]) -> dict[str, dict[str, Any]]:
    """sha256 of `files`, each rank hashing every world-th file; the union on every rank."""
    rank, world = _rank_world()
    mine = {
        f: {"sha256": sha256_file(ckpt / f), "bytes": (ckpt / f).stat().st_size}
        for i, f in enumerate(files)
        if i % world == rank
    }
    merged: dict[str, dict[str, Any]] = {}
    for part in _all_gather_object(mine):
        merged.update(part)
    return merged


def is_complete(ckpt: Path) -> bool:
    return ckpt.is_dir() and STEP_RE.match(ckpt.name) is not None and (ckpt / FILES_LIST).is_file()


def verify_checkpoint(ckpt: str | os.PathLike) -> None:
    """Raise RdptCheckpointError naming the first missing/corrupted file (collective if dist)."""
    ckpt = Path(ckpt)
    problems: list[str] = []
    if not (ckpt / FILES_LIST).is_file():
        problems.append(f"{ckpt / FILES_LIST} is missing (checkpoint incomplete)")
        expected: dict[str, Any] = {}
    else:
        try:
            expected = json.loads((ckpt / FILES_LIST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            problems.append(f"{ckpt / FILES_LIST} is unreadable: {e}")
            expected = {}
    if expected:
        rank, world = _rank_world()
        for i, (rel, want) in enumerate(sorted(expected.items())):
            if i % world != rank:
                continue
            path = ckpt / rel
            if not path.is_file():
                problems.append(f"{path} is missing")
            elif path.stat().st_size != want["bytes"]:
                problems.append(f"{path} has {path.stat().st_size} bytes, expected {want['bytes']}")
            elif sha256_file(path) != want["sha256"]:
                problems.append(f"{path} is corrupted (sha256 mismatch)")
    all_problems = sorted({p for part in _all_gather_object(problems) for p in part})
    if all_problems:
        raise RdptCheckpointError(
            f"checkpoint {ckpt} is corrupted or incomplete: " + "; ".join(all_problems)
        )


class CheckpointManager:
    """Save / find / verify / load the checkpoints of one run (call on every rank)."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep_last = keep_last

    # ------------------------------------------------------------------ finding

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if is_complete(p)), key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The checkpoint the `latest` pointer names (or the newest complete one)."""
        pointer = self.root / "latest"
        if pointer.is_file():
            cand = self.root / pointer.read_text().strip()
            if is_complete(cand):
                return cand
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def find_resume(self, resume: str, verify: bool = True) -> Path | None:
        """'none' -> None; 'auto' -> newest checkpoint that verifies (falls back past corrupted
        ones, warning by name); a path -> that checkpoint (an error if it does not verify)."""
        if resume == "none":
            return None
        if resume != "auto":
            ckpt = Path(resume)
            if not is_complete(ckpt):
                raise RdptCheckpointError(f"--resume {resume}: not a complete checkpoint directory")
            if verify:
                verify_checkpoint(ckpt)
            return ckpt
        candidates = self.complete_checkpoints()[::-1]
        latest = self.latest()
        if latest is not None and latest in candidates:
            candidates.remove(latest)
            candidates.insert(0, latest)
        for ckpt in candidates:
            try:
                if verify:
                    verify_checkpoint(ckpt)
                return ckpt
            except RdptCheckpointError as e:
                log.warning("skipping checkpoint: %s", e)
                if _rank_world()[0] == 0:
                    print(f"WARNING: {e}; falling back to the previous checkpoint", flush=True)
        return None

    # ------------------------------------------------------------------ saving

    def save(
        self,
        engine,
        step: int,
        trainer_state: dict[str, Any],
        *,
        config_yaml: str,
        tokenizer_path: str | os.PathLike | None = None,
        phase_hook: Callable[[str, Any], None] | None = None,
    ) -> Path:
        """Write checkpoint `step` (collective): temp dir -> files -> sha256 list -> rename ->
        `latest` -> prune. Returns the final directory.

        A full disk (or quota, or a write cut short) on any rank raises RdptCheckpointError on
        every rank that was writing, naming the file and the checkpoint that stays in use; the
        temporary directory is removed. `phase_hook(phase,
        engine)` is called at "engine" (before DeepSpeed writes), "files" (everything written,
        nothing hashed) and "renamed" (the directory has its final name, `latest` not yet
        moved): where the tests kill a rank."""
        name = checkpoint_name(step)
        tmp = self.root / f".tmp-{name}"
        try:
            return self._save(engine, step, trainer_state, config_yaml, tokenizer_path,
                              phase_hook or (lambda phase, engine: None))  # fmt: skip
        except Exception as e:
            # NOTE: the first rank to fail sees the full disk; a later one may find the space
            # already given back (its torch.save write cut short), or the temporary directory
            # gone under its feet (only this path removes it during a save).
            full = is_disk_full(e, where=self.root)
            short = is_short_write(e)
            gone = not tmp.is_dir()
            if not (full or short or gone):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back
            previous = self.latest()
            if full:
                why = "No space left on device"
            elif short:
                why = f"a write was cut short ({e}; a full disk or quota, or an I/O error)"
            else:
                why = f"another rank failed writing it and removed {tmp.name}"
            raise RdptCheckpointError(
                f"checkpoint step {step} could not be written: {why} "
                f"({getattr(e, 'filename', None) or tmp}); free space under {self.root}. "
                + (
                    f"The previous checkpoint {previous.name} is intact and --resume auto "
                    f"continues from it."
                    if previous is not None
                    else "There is no earlier checkpoint."
                )
            ) from e

    def _save(self, engine, step, trainer_state, config_yaml, tokenizer_path, phase) -> Path:
        rank, _ = _rank_world()
        name = checkpoint_name(step)
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        phase("engine", engine)
        engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={}, save_latest=False)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")
        if rank == 0:
            state = dict(trainer_state, step=step)
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
            (tmp / "config.yaml").write_text(config_yaml)
            if tokenizer_path is not None and Path(tokenizer_path).is_file():
                shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        _barrier()
        phase("files", engine)
        files = _checkpoint_files(tmp)
        hashes = _hash_striped(tmp, files)
        if rank == 0:
            for rel in files:
                with open(tmp / rel, "rb") as f:
                    os.fsync(f.fileno())
            atomic_write_json(tmp / FILES_LIST, hashes)
            if final.exists():  # re-saving a step (resumed after a crash at save): replace
                shutil.rmtree(final)
            # NOTE: order matters: rename the complete dir, then the pointer, then prune.
            os.rename(tmp, final)
            fsync_dir(self.root)
            phase("renamed", engine)
            atomic_write_text(self.root / "latest", name + "\n")
            self._prune(keep=final)
        _barrier()
        return final

    def _prune(self, keep: Path) -> None:
        done = self.complete_checkpoints()
        for old in done[: max(0, len(done) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ loading

    def load(self, engine, ckpt: Path) -> dict[str, Any]:
        """Restore engine (model + optimizer) and this rank's RNG; return the trainer state."""
        state = read_trainer_state(ckpt)
        with weights_only_loads():
            load_path, _ = engine.load_checkpoint(
                str(ckpt), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        if load_path is None:
            raise RdptCheckpointError(f"DeepSpeed could not load {ckpt / DS_TAG}")
        rank, _ = _rank_world()
        rng_file = ckpt / "rng" / f"rank-{rank:05d}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        return state


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside the block, DeepSpeed's own included, runs with weights_only=True
    (TORCH_FORCE_WEIGHTS_ONLY_LOAD) and allows only the DeepSpeed classes listed above, so a
    tampered checkpoint cannot execute code when it is resumed, evaluated or exported."""
    import importlib

    allowed = []
    for module, name in _DEEPSPEED_SAFE_GLOBALS:
        obj = getattr(importlib.import_module(module), name, None)
        if obj is not None:
            allowed.append(obj)
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RdptCheckpointError(
            f"refusing to load a checkpoint file that holds more than tensors and the few "
            f"DeepSpeed records rdpt allows (it could run code when unpickled): {first}"
        ) from e
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def read_trainer_state(ckpt: str | os.PathLike) -> dict[str, Any]:
    path = Path(ckpt) / TRAINER_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RdptCheckpointError(f"cannot read {path}: {e}") from None


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two JSON-like values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in a:
                out.append(f"{key}: absent in checkpoint, {b[k]!r} now")
            elif k not in b:
                out.append(f"{key}: {a[k]!r} in checkpoint, absent now")
            else:
                out.extend(_diff(a[k], b[k], key))
        return out
    return [] if a == b else [f"{prefix}: {a!r} in checkpoint, {b!r} now"]


def check_compatible(saved: dict[str, Any], ckpt: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume from a checkpoint of a different dataset, model or optimizer layout
    (`identity`: training.state.run_identity of this run), saying what differs."""
    want = identity["manifest_sha256"]
    if saved.get("manifest_sha256") != want:
        raise RdptCheckpointError(
            f"checkpoint {ckpt} was trained on a different dataset: manifest sha256 "
            f"{saved.get('manifest_sha256')} (dataset {saved.get('data_path')}) in checkpoint, "
            f"{want} now; start a new run (run.name=...) or --resume none"
        )
    # model.init (how weights were initialised, e.g. with rbar) and how the loss is sliced do
    # not bind a resumed run
    free = ("init", "loss_chunk_tokens")
    saved_model = {k: v for k, v in saved.get("model_config", {}).items() if k not in free}
    now_model = {k: v for k, v in identity["model_config"].items() if k not in free}
    diffs = _diff(saved_model, now_model, "model")
    if diffs:
        raise RdptCheckpointError(
            f"checkpoint {ckpt} has an incompatible model config: " + "; ".join(diffs)
        )
    was, now = saved.get("parallel", {}), identity["parallel"]
    if was.get("tp") != now["tp"]:
        raise RdptCheckpointError(
            f"checkpoint {ckpt} was written with parallel.tp={was.get('tp')}, now tp={now['tp']}"
        )
    stage, dp = now["zero_stage"], now["dp"]
    if was.get("zero_stage") != stage or (stage > 0 and was.get("dp") != dp):
        raise RdptCheckpointError(
            f"checkpoint {ckpt} was written with ZeRO stage {was.get('zero_stage')} x dp "
            f"{was.get('dp')}; now stage {stage} x dp {dp}: the optimizer partitions differ "
            f"(resume with the same layout)"
        )


class RunCheckpoints:
    """The run's checkpoints as the training loop uses them (call on every rank).

    ckpts = RunCheckpoints(ctx, identity, tokenizer_path, tracker, hooks)
    state = ckpts.resume(engine, loader, "auto", tokens_per_step)   # TrainerState
    ckpts.save(engine, state, loader)         # no-op when this step is already saved
    """

    def __init__(self, ctx, identity: dict[str, Any], tokenizer_path, tracker, hooks) -> None:
        from pipeline.common.config_io import to_yaml

        cfg = ctx.cfg
        self.manager = CheckpointManager(ctx.run_dir, keep_last=cfg.checkpoint.keep_last)
        self.verify = cfg.checkpoint.verify_on_load
        self.identity = identity
        self.config_yaml = to_yaml(cfg)
        self.tokenizer_path = tokenizer_path
        self.tracker = tracker
        self.hooks = hooks
        self.last_saved: int | None = None

    def resume(self, engine, loader, resume: str, tokens_per_step: int):
        """Restore engine, RNG and loader from the checkpoint `resume` names ('auto': the newest
        that verifies; 'none'); returns the TrainerState to continue from."""
        from pipeline.training.state import TrainerState

        ckpt = self.manager.find_resume(resume, verify=self.verify)
        if ckpt is None:
            return TrainerState()
        check_compatible(read_trainer_state(ckpt), ckpt, self.identity)
        state = TrainerState.from_json(self.manager.load(engine, ckpt), tokens_per_step)
        loader.load_state_dict(state.loader)
        self.last_saved = state.step
        log.info("resumed from %s (step %d)", ckpt, state.step)
        return state

    def save(self, engine, state, loader) -> Path | None:
        """Checkpoint `state.step` (collective); skipped when that step is already saved."""
        if self.last_saved == state.step:
            return None
        import time

        from pipeline.common.atomic import sha256_file

        state.loader = loader.state_dict()
        payload = {**state.to_json(), **self.identity, "time": time.time()}
        step = state.step
        path = self.manager.save(
            engine,
            step,
            payload,
            config_yaml=self.config_yaml,
            tokenizer_path=self.tokenizer_path,
            phase_hook=lambda phase, engine: self.hooks.in_checkpoint(step, phase, engine),
        )
        if self.tracker is not None:
            # the digest of the file list, which holds every file's sha256: one value that
            # identifies the whole checkpoint (the tracker measures its size)
            self.tracker.log_checkpoint_reference(path, step, sha256=sha256_file(path / FILES_LIST))
        log.info("checkpoint %s", path)
        self.last_saved = step
        return path


# ---------------------------------------------------------------------- reading a checkpoint


def resolve_checkpoint(run_dir_or_ckpt: str | os.PathLike) -> Path:
    """A checkpoint dir, or a run dir (-> its newest checkpoint that verifies)."""
    p = Path(run_dir_or_ckpt)
    if is_complete(p):
        return p
    if (p / "checkpoints").is_dir():
        ckpt = CheckpointManager(p).find_resume("auto", verify=True)
        if ckpt is not None:
            return ckpt
        raise RdptCheckpointError(f"{p}: no complete, uncorrupted checkpoint under checkpoints/")
    raise RdptCheckpointError(
        f"{p}: neither a run directory nor a complete checkpoint (evaluation also reads a "
        "consolidated export: model.safetensors + model.yaml, or a Hugging Face Huginn directory)"
    )


def completed_step(run_dir: str | os.PathLike) -> int | None:
    """Step of the run's newest checkpoint that verifies (None when there is none): what
    `--resume auto` would continue from."""
    latest = CheckpointManager(run_dir).find_resume("auto", verify=True)
    if latest is None:
        return None
    try:
        return int(read_trainer_state(latest)["step"])
    except (RdptCheckpointError, KeyError, ValueError):
        return None


def consolidated_state_dict(ckpt: str | os.PathLike, model_cfg=None) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from DeepSpeed's files (ZeRO 0-3, tensor-parallel size 1), under
    the consolidated format's names (model/consolidated.py). With `model_cfg`, only the model's
    parameters are kept (DeepSpeed's files may hold buffers too)."""
    from pipeline.model.consolidated import consolidated_name, parameter_names

    ckpt = Path(ckpt)
    state = read_trainer_state(ckpt)
    par = state.get("parallel", {})
    if par.get("tp", 1) != 1:
        raise RdptCheckpointError(
            f"{ckpt}: consolidating a tensor-parallel (tp={par['tp']}) checkpoint is not "
            f"supported; train with parallel.tp=1 or convert with the model converter"
        )
    with weights_only_loads():
        if par.get("zero_stage", 0) >= 1:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
        else:
            blob = torch.load(
                ckpt / DS_TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True
            )
            sd = blob["module"]
    full = {
        consolidated_name(k): v.detach().float().contiguous()
        for k, v in sd.items()
        if torch.is_tensor(v)
    }
    if model_cfg is not None:
        keep = parameter_names(model_cfg)
        full = {k: v for k, v in full.items() if k in keep}
    return full


def checkpoint_config(ckpt: str | os.PathLike):
    """The resolved TrainConfig a checkpoint was written with (its config.yaml)."""
    from pipeline.common.config_io import load_config
    from pipeline.training.config import TrainConfig

    return load_config(TrainConfig, Path(ckpt) / "config.yaml")
