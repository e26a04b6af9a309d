"""KV cache for cached (incremental) forwards, keyed by (block, slot, layer).

megatron's own inference cache is keyed by layer_number, so prelude, core and coda layers, and
every core iteration, would collide. Here a key is ("prelude"|"core"|"coda", slot, layer_idx):
the prelude and coda use slot 0; the core uses the slot the caller passes (iteration i, or
i % budget for Huginn's KV sharing, which keeps memory constant in r).

Entries are position-indexed buffers: writing keys for positions [offset, offset + S) overwrites
what a previous write at the same positions left (a shared slot rewritten by a later iteration
of the same token) and grows the buffer when needed. Reading returns positions [0, offset + S).
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-(block, slot, layer) key/value buffers in megatron layout [S, B, heads, head_dim]."""

    def __init__(self) -> None:
        self._k: dict[tuple[str, int, int], torch.Tensor] = {}
        self._v: dict[tuple[str, int, int], torch.Tensor] = {}
        self._len: dict[tuple[str, int, int], int] = {}

    def __len__(self) -> int:
        return len(self._k)

    def keys(self):
        return self._k.keys()

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
        if offset > have:
            raise ValueError(
                f"KV cache {key}: writing at position {offset} but only {have} positions are "
                "cached (positions must be written in order)"
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
        self._k[key][offset:end] = k_SBNh
        self._v[key][offset:end] = v_SBNh
        # NOTE: positions after `end` (from a longer earlier write) are dropped on purpose.
        self._len[key] = end
        return self._k[key][:end], self._v[key][:end]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self._k.values(), *self._v.values()])
