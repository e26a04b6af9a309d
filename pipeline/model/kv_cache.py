"""KV cache for cached (incremental) forwards, keyed by (block, slot, layer).

megatron's own inference cache is keyed by layer_number, so prelude, core and coda layers, and
every core iteration, would collide. Here a key is ("prelude"|"core"|"coda", slot, layer_idx):
the prelude and coda use slot 0; the core uses the slot the caller passes (iteration i, or
i % budget for Huginn's KV sharing, which keeps memory constant in r).

Entries are position-indexed buffers: writing keys for positions [offset, offset + S) overwrites
what a previous write at the same positions left (a shared slot rewritten by a later iteration
of the same token) and grows the buffer when needed. Reading returns positions [0, offset + S).

A slot may miss earlier positions (a token that exited early, per-token adaptive depth, never
wrote it): those positions are filled from the most recently written slot of the same
(block, layer) that has them (Huginn's "latest" lookup), so attention always sees every
earlier position.

`CacheView` is how a cache reaches the layers: megatron's TransformerBlock passes its
`inference_context` argument unchanged to every layer (megatron-core 0.16 and 0.19 do nothing
else with it unless CUDA graphs are on, which rdpt never enables), so the model passes a
CacheView (cache, block name, slot, position offset) there and each layer adds its own index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    """Per-(block, slot, layer) key/value buffers in megatron layout [S, B, heads, head_dim]."""

    def __init__(self) -> None:
        self._k: dict[tuple[str, int, int], torch.Tensor] = {}
        self._v: dict[tuple[str, int, int], torch.Tensor] = {}
        self._len: dict[tuple[str, int, int], int] = {}
        self._written: dict[tuple[str, int, int], int] = {}  # key -> write counter
        self._clock = 0

    def __len__(self) -> int:
        return len(self._k)

    def keys(self):
        return self._k.keys()

    def get(self, key: tuple[str, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys/values of `key` for positions [0, length) (views, no copy)."""
        n = self._len[key]
        return self._k[key][:n], self._v[key][:n]

    def length(self, key: tuple[str, int, int]) -> int:
        """Number of valid positions stored under `key` (0 if absent)."""
        return self._len.get(key, 0)

    def update(
        self, key: tuple[str, int, int], k_SBNh: torch.Tensor, v_SBNh: torch.Tensor, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v for positions [offset, offset+S) and return all keys/values [0, offset+S)."""
        S = k_SBNh.shape[0]
        end = offset + S
        have = self._len.get(key, 0)
        donor = None
        if offset > have:
            donor = self._latest_donor(key, offset)
            if donor is None:
                raise ValueError(
                    f"KV cache {key}: writing at position {offset} but only {have} positions "
                    "are cached and no other slot of this layer has them"
                )
        buf_k = self._k.get(key)
        if buf_k is None or buf_k.shape[0] < end:
            cap = max(end, 2 * (buf_k.shape[0] if buf_k is not None else 0), 16)
            new_k = k_SBNh.new_empty((cap, *k_SBNh.shape[1:]))
            new_v = v_SBNh.new_empty((cap, *v_SBNh.shape[1:]))
            if buf_k is not None and have:
                new_k[:have] = buf_k[:have]
                new_v[:have] = self._v[key][:have]
            self._k[key], self._v[key] = new_k, new_v
        if donor is not None:
            self._k[key][have:offset] = self._k[donor][have:offset]
            self._v[key][have:offset] = self._v[donor][have:offset]
        self._k[key][offset:end] = k_SBNh
        self._v[key][offset:end] = v_SBNh
        # NOTE: positions after `end` (from a longer earlier write) are dropped on purpose.
        self._len[key] = end
        self._clock += 1
        self._written[key] = self._clock
        return self._k[key][:end], self._v[key][:end]

    def _latest_donor(self, key, offset):
        block, _, layer = key
        candidates = [
            other
            for other in self._k
            if other[0] == block
            and other[2] == layer
            and other != key
            and self._len[other] >= offset
        ]
        return max(candidates, key=lambda o: self._written[o], default=None)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self._k.values(), *self._v.values()])


@dataclass(frozen=True)
class CacheView:
    """One block's view of a KVCache for one call: layer `i` of the block stores and reads
    its keys/values under (block, slot, i) at positions [offset, offset + S)."""

    cache: KVCache
    block: str
    slot: int
    offset: int

    def update(self, layer: int, k_SBNh: torch.Tensor, v_SBNh: torch.Tensor):
        return self.cache.update((self.block, self.slot, layer), k_SBNh, v_SBNh, self.offset)

    def padding_mask(self, sq: int) -> torch.Tensor | None:
        """The attention mask of the `sq` queries of this call when the cache holds a
        left-padded batch (continuous_thought.AppendKVCache with `starts_B`): boolean
        [B, 1, sq, offset + sq]; None for every other cache (plain causal attention)."""
        mask_for = getattr(self.cache, "padding_mask", None)
        return None if mask_for is None else mask_for(self.offset, sq)
