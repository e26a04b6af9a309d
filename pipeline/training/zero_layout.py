"""Which slice of which tensor the optimizer steps belongs to which model parameter.

DeepSpeed's ZeRO-1/2/3 (and its bf16 optimizer) hand the base optimizer flat partitions that
cut parameters anywhere. Statistics that need whole parameters (ellis_adam's per-tensor update
clipping, per-block telemetry) sum over `Segment`s keyed by the parameter's index in the model's
named_parameters order (the same on every rank) and all-reduce the small per-key vector.

    layout, n_keys = tensor_layout(engine)      # {id(flat tensor): [Segment, ...]}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Segment:
    """Elements [start, start + length) of a (flat) optimizer tensor belong to model parameter
    `key` (its index in the model's named_parameters order, the same on every rank)."""

    start: int
    length: int
    key: int


def tensor_layout(engine) -> tuple[dict[int, list[Segment]], int]:
    """({id(optimizer tensor): its segments}, number of model parameters) for the tensors the
    base optimizer inside DeepSpeed `engine` steps: ZeRO 0 (the parameters themselves), 1/2
    (flat partitions of each param group), 3 (flat partitions of each sub-group), and the bf16
    optimizer's flat fp32 copies."""
    module = engine.module
    keys = {id(p): i for i, (_, p) in enumerate(module.named_parameters())}
    n_keys = len(keys)
    ds_opt = engine.optimizer
    layout: dict[int, list[Segment]] = {}
    if hasattr(ds_opt, "round_robin_bit16_groups"):  # ZeRO 1/2
        for i, params in enumerate(ds_opt.round_robin_bit16_groups):
            rank = dist.get_rank(group=ds_opt.real_dp_process_group[i])
            size = int(ds_opt.partition_size[i])
            lo, hi = rank * size, (rank + 1) * size
            segs = []
            for p, off in zip(params, ds_opt.round_robin_bit16_offsets[i], strict=True):
                a, b = max(lo, off), min(hi, off + p.numel())
                if a < b:
                    segs.append(Segment(a - lo, b - a, keys[id(p)]))
            layout[id(ds_opt.single_partition_of_fp32_groups[i])] = segs
    elif hasattr(ds_opt, "fp32_partitioned_groups_flat"):  # ZeRO 3
        for sub, params in enumerate(ds_opt.fp16_groups):
            rank = dist.get_rank(group=ds_opt.dp_process_group)
            segs, off = [], 0
            for p in params:
                part = p.partition_numel()
                valid = max(0, min(part, p.ds_numel - rank * part))
                if valid:
                    segs.append(Segment(off, valid, keys[id(p)]))
                off += part
            layout[id(ds_opt.fp32_partitioned_groups_flat[sub])] = segs
    elif hasattr(ds_opt, "fp32_groups_flat_partition"):  # bf16 optimizer at ZeRO 0
        for i, params in enumerate(ds_opt.bf16_groups):
            rank = dist.get_rank(group=ds_opt.real_dp_process_group[i])
            size = int(ds_opt.fp32_groups_flat_partition[i].numel())
            lo, hi = rank * size, (rank + 1) * size
            segs, off = [], 0
            for p in params:
                a, b = max(lo, off), min(hi, off + p.numel())
                if a < b:
                    segs.append(Segment(a - lo, b - a, keys[id(p)]))
                off += p.numel()
            layout[id(ds_opt.fp32_groups_flat_partition[i])] = segs
    else:  # ZeRO 0 in fp32: the optimizer steps the parameters themselves
        for _, p in module.named_parameters():
            layout[id(p)] = [Segment(0, p.numel(), keys[id(p)])]
    return layout, n_keys
