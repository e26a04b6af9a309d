"""rdpt's consolidated model checkpoint: one safetensors file with the megatron state dict,
TP-unsharded, plus the ModelConfig as YAML. Training exports it, evaluation and `rdpt convert`
read it, and any TP size can load it (resharded on load).

    <dir>/model.safetensors   names as in RecurrentDepthLM.named_parameters() (tied head stored
                              once as embedding.weight) except that a block's layers are
                              `<part>_block.<i>` (the model's TransformerBlocks hold them as
                              `<part>_block.layers.<i>`: `consolidated_name`); QKV rows in
                              megatron's head-major [head, (q|k|v), head_dim] order; fc1 rows
                              [gate | up]
    <dir>/model.yaml          the ModelConfig

    save_consolidated(model, cfg, out_dir)    # collective over the TP group; rank 0 writes
    cfg, full_sd = load_consolidated(dir)
    model = build_model(cfg); load_full_state_dict(model, full_sd)
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from pipeline.common.errors import RdptCheckpointError
from pipeline.model.config import ModelConfig

FORMAT = "rdpt-consolidated-v1"
WEIGHTS = "model.safetensors"
CONFIG = "model.yaml"
RECURRENCE = "recurrence.yaml"  # {mean_recurrence, mean_backprop_depth} the model trained with


_BLOCK_LAYER = re.compile(r"^(prelude_block|core_block|coda_block)\.layers\.(\d+)\.")


def consolidated_name(name: str) -> str:
    """The consolidated (format v1) name of a model parameter: megatron's TransformerBlock keeps
    its layers in a ModuleList called `layers`; the format names them `<part>_block.<i>`."""
    return _BLOCK_LAYER.sub(r"\1.\2.", name)


def _tp_info(p: torch.Tensor) -> tuple[bool, int, int]:
    if getattr(p, "tensor_model_parallel", False):
        return True, int(p.partition_dim), int(getattr(p, "partition_stride", 1))
    return False, 0, 1


def shard_tensor(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    """This rank's shard of a TP-partitioned tensor (stride s: the dim is cut into world*s
    chunks and rank r takes chunks r, r+world, ...: how megatron splits fused [gate|up])."""
    chunks = torch.chunk(full, world * stride, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)


def unshard_tensors(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of shard_tensor over all ranks' shards (in rank order)."""
    world = len(shards)
    pieces = [torch.chunk(s, stride, dim=dim) for s in shards]
    ordered = [pieces[r][j] for j in range(stride) for r in range(world)]
    return torch.cat(ordered, dim=dim)


def full_state_dict(model, grads: bool = False) -> dict[str, torch.Tensor]:
    """The TP-unsharded parameters (or, with grads=True, their gradients) of `model` on CPU.
    A collective over the TP group: every TP rank must call it. Tied weights appear once."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    out = {}
    for name, p in model.named_parameters():
        t = p.detach() if not grads else p.grad
        if t is None:
            raise RdptCheckpointError(f"{name}: no gradient to gather")
        parallel, dim, stride = _tp_info(p)
        if parallel and tp > 1:
            shards = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(shards, t.contiguous(), group=group)
            t = unshard_tensors(shards, dim, stride)
        out[consolidated_name(name)] = t.cpu().clone()
    return out


def load_full_state_dict(
    model, full_sd: dict[str, torch.Tensor], gather=None, may_miss: tuple[str, ...] = ()
) -> None:
    """Copy TP-unsharded tensors into `model`, taking this TP rank's shard of each.

    `gather(param)`: a context manager in which a partitioned parameter is whole (the training
    area passes DeepSpeed's GatheredParameters under ZeRO-3); default: parameters are whole.
    `may_miss`: name prefixes of parameters `full_sd` may lack (they keep their values)."""
    import contextlib

    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    params = {consolidated_name(n): p for n, p in model.named_parameters()}
    missing = sorted(n for n in set(params) - set(full_sd) if not n.startswith(may_miss))
    unexpected = sorted(set(full_sd) - set(params))
    if missing or unexpected:
        raise RdptCheckpointError(
            f"state dict does not match the model: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    gather = gather or (lambda p: contextlib.nullcontext())
    for name, p in params.items():
        if name not in full_sd:
            continue  # allowed by may_miss
        t = full_sd[name]
        parallel, dim, stride = _tp_info(p)
        if parallel and tp > 1:
            t = shard_tensor(t, dim, stride, rank, tp)
        with gather(p), torch.no_grad():
            if tuple(t.shape) != tuple(p.shape):
                raise RdptCheckpointError(
                    f"{name}: checkpoint shape {tuple(t.shape)} != model shard {tuple(p.shape)}"
                )
            p.copy_(t.to(p.dtype))


def write_consolidated(
    full_sd: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    recurrence: dict | None = None,
    extra_files: dict | None = None,
) -> Path:
    """Write an already gathered state dict + config as a consolidated checkpoint directory
    (built under a temporary name, then renamed). `recurrence`: the mean r and backprop depth
    the model was trained with ({"mean_recurrence": ..., "mean_backprop_depth": ...}), written
    as recurrence.yaml; evaluation uses the mean as its default r. `extra_files`: {name: path}
    copied in as well (the tokenizer.json)."""
    import yaml
    from safetensors.torch import save_file

    from pipeline.common.atomic import atomic_directory
    from pipeline.common.config_io import to_yaml

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise RdptCheckpointError(f"{out_dir}: already exists (refusing to overwrite)")
    with atomic_directory(out_dir) as tmp:
        tensors = {k: v.contiguous() for k, v in full_sd.items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        # init_from says where a training run started, not what this model is
        (tmp / CONFIG).write_text(to_yaml(cfg.model_copy(update={"init_from": None})))
        if recurrence is not None:
            (tmp / RECURRENCE).write_text(yaml.safe_dump(dict(recurrence), sort_keys=False))
        for name, src in (extra_files or {}).items():  # e.g. the tokenizer.json
            shutil.copyfile(src, tmp / name)
    return out_dir


def save_consolidated(model, cfg: ModelConfig, out_dir: str | os.PathLike) -> Path | None:
    """Gather `model` over TP and write it (global rank 0 writes; all TP ranks must call)."""
    import torch.distributed as dist

    full = full_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return write_consolidated(full, cfg, out_dir)


def load_consolidated(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, TP-unsharded state dict) of a consolidated checkpoint directory."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pipeline.common.config_io import load_config

    path = Path(path)
    weights, config = path / WEIGHTS, path / CONFIG
    for f in (weights, config):
        if not f.is_file():
            raise RdptCheckpointError(
                f"{path}: not an rdpt consolidated checkpoint ({f.name} missing)"
            )
    with safe_open(str(weights), framework="pt") as f:
        fmt = (f.metadata() or {}).get("format")
    if fmt != FORMAT:
        raise RdptCheckpointError(f"{weights}: format {fmt!r}, expected {FORMAT!r}")
    return load_config(ModelConfig, config), load_file(str(weights))


def read_recurrence(path: str | os.PathLike) -> dict | None:
    """The training recurrence recorded in a consolidated checkpoint (None when absent)."""
    import yaml

    f = Path(path) / RECURRENCE
    return yaml.safe_load(f.read_text()) if f.is_file() else None


def build_from_consolidated(path: str | os.PathLike, params_dtype=None):
    """Build a model for the current parallel_state and load a consolidated checkpoint."""
    from pipeline.model.build import build_model

    cfg, sd = load_consolidated(path)
    model = build_model(cfg, params_dtype=params_dtype)
    load_full_state_dict(model, sd)
    return model, cfg


def parameter_names(cfg: ModelConfig) -> set[str]:
    """The consolidated names of the parameters of a model of `cfg` (built on the meta device:
    nothing is allocated; megatron parallel_state is initialised at tp=1 when missing)."""
    from megatron.core import parallel_state

    from pipeline.model.build import build_model
    from pipeline.model.runtime import init_model_parallel

    if not parallel_state.model_parallel_is_initialized():
        init_model_parallel(tp=1)
    with torch.device("meta"):
        model = build_model(cfg)
    return {consolidated_name(n) for n, _ in model.named_parameters()}
