"""A KV cache allocated once for a whole decode: no growth, no copies, no per-step bookkeeping.

`kv_cache.KVCache` grows its buffers on demand and keeps a dictionary of lengths and write
clocks so that any access pattern works. A decode knows its shape up front (batch, the longest
sequence it will reach, the number of core slots), so `StaticKVCache` allocates every buffer
at once: one per prelude layer, per (core slot, core layer) and per coda layer. A write stores
keys/values at positions [offset, offset + S) in place and the attention reads the view
[0, offset + S): the same values as the growing cache, so the attention computes bitwise the
same result.

Memory layout: one buffer per (block, slot), [layers, B, heads, 2 (k|v), capacity, head_dim]:
a head's keys are contiguous over positions (what attention over one query reads, without
4 KiB strides between positions), and a position's key and value of all heads are written
by one copy (model/fast_decode.py). Layers see it through `k_LCBNh` / `v_LCBNh`, views in the
megatron order [layers, capacity, B, heads, head_dim].

Positions a slot never wrote are not filled from other slots here (KVCache's "latest entry"
lookup): the decode loop writes every slot it will read (an early-exiting token's entry is
copied into the slots it skipped with `copy_position`), which is what makes the lookup
unnecessary.

    cache = StaticKVCache.for_model(model, batch=1, capacity=128, core_slots=4, device=dev)
    view = cache.view("core", slot=2)      # made once; its offset is set per position
    view.offset = 17
    k_all, v_all = view.update(0, k_SBNh, v_SBNh)   # what the attention layer calls
"""

from __future__ import annotations

import torch


class StaticCacheView:
    """One block's (and one core slot's) window on a StaticKVCache; `offset` is the first
    position the next write covers. Layers call `update(layer, k, v)` like kv_cache.CacheView."""

    __slots__ = ("kv_LBN2Ch", "k_LCBNh", "v_LCBNh", "offset")

    def __init__(self, kv_LBN2Ch: torch.Tensor):
        self.kv_LBN2Ch = kv_LBN2Ch
        self.k_LCBNh = kv_LBN2Ch[:, :, :, 0].permute(0, 3, 1, 2, 4)
        self.v_LCBNh = kv_LBN2Ch[:, :, :, 1].permute(0, 3, 1, 2, 4)
        self.offset = 0

    def update(self, layer: int, k_SBNh: torch.Tensor, v_SBNh: torch.Tensor):
        end = self.offset + k_SBNh.shape[0]
        k_buf, v_buf = self.k_LCBNh[layer], self.v_LCBNh[layer]
        k_buf[self.offset : end] = k_SBNh
        v_buf[self.offset : end] = v_SBNh
        return k_buf[:end], v_buf[:end]


class PositionTensorView:
    """A window like StaticCacheView for static-shape decode steps (torch.compile without
    recompiles, CUDA graphs): the position is a tensor `pos_1` written in place, the write is an
    index_copy_, and the attention reads the whole buffer with `key_mask_K` (positions
    <= pos) instead of a slice whose length changes every step."""

    def __init__(self, k_LCBNh, v_LCBNh, pos_1: torch.Tensor, key_mask_K: torch.Tensor):
        self.k_LCBNh, self.v_LCBNh = k_LCBNh, v_LCBNh
        self.pos_1, self.key_mask_K = pos_1, key_mask_K

    def update(self, layer: int, k_SBNh: torch.Tensor, v_SBNh: torch.Tensor):
        k_buf, v_buf = self.k_LCBNh[layer], self.v_LCBNh[layer]
        k_buf.index_copy_(0, self.pos_1, k_SBNh)
        v_buf.index_copy_(0, self.pos_1, v_SBNh)
        return k_buf, v_buf


class StaticKVCache:
    """Preallocated keys/values for the prelude, `core_slots` core slots and the coda."""

    def __init__(
        self,
        *,
        layers: dict[str, int],
        core_slots: int,
        batch: int,
        capacity: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device,
    ):
        if core_slots < 1 or capacity < 1 or batch < 1:
            raise ValueError(
                f"static KV cache: core_slots, capacity and batch must be >= 1, got "
                f"{core_slots}, {capacity}, {batch}"
            )
        self.capacity, self.batch, self.core_slots = capacity, batch, core_slots
        shape = (batch, heads, 2, capacity, head_dim)
        self._views: dict[tuple[str, int], StaticCacheView] = {}
        for block, n_layers in layers.items():
            for slot in range(core_slots if block == "core" else 1):
                kv = torch.zeros((n_layers, *shape), dtype=dtype, device=device)
                self._views[(block, slot)] = StaticCacheView(kv)

    @classmethod
    def for_model(cls, model, *, batch: int, capacity: int, core_slots: int, device, dtype=None):
        """A cache shaped for `model` (a RecurrentDepthLM; heads are this TP rank's)."""
        attn = model.core_block.layers[0].self_attention
        return cls(
            layers={
                "prelude": len(model.prelude_block.layers),
                "core": len(model.core_block.layers),
                "coda": len(model.coda_block.layers),
            },
            core_slots=core_slots,
            batch=batch,
            capacity=capacity,
            heads=attn.num_heads_local,
            head_dim=attn.head_dim,
            dtype=dtype or model.embedding.weight.dtype,
            device=device,
        )

    def view(self, block: str, slot: int = 0) -> StaticCacheView:
        return self._views[(block, slot)]

    def position_tensor_view(self, block: str, slot: int, pos_1, key_mask_K) -> PositionTensorView:
        """The same buffers as view(block, slot), addressed by a position tensor."""
        v = self._views[(block, slot)]
        return PositionTensorView(v.k_LCBNh, v.v_LCBNh, pos_1, key_mask_K)

    def copy_position(self, position: int, src_slot: int, dst_slots: range) -> None:
        """Copy the core entries of `position` from src_slot into every slot of dst_slots."""
        src = self._views[("core", src_slot)]
        for dst_slot in dst_slots:
            dst = self._views[("core", dst_slot)]
            dst.k_LCBNh[:, position] = src.k_LCBNh[:, position]
            dst.v_LCBNh[:, position] = src.v_LCBNh[:, position]

    def memory_bytes(self) -> int:
        return sum(v.kv_LBN2Ch.numel() * v.kv_LBN2Ch.element_size() for v in self._views.values())
