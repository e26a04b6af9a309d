"""RoPE cos/sin precomputed once for every position a decode can reach.

The layers' usual path (`compat.apply_rope`) takes the angle table and computes cos and sin
again in every attention call: in a decode step that is 2 x layers x r times per token for the
same position. `RopeTable` computes them once for positions [0, capacity); `RopeSlice` holds
the rows of one call and applies the rotation with the same floating-point operations, so the
result is bitwise that of `compat.apply_rope` (tests/test_decode.py checks it):

    (t * cos) + (rotate_half(t) * sin)    with rotate_half(t)[2i], [2i+1] = -t[2i+1], t[2i]

`rotate_half(t) * sin` is computed as `pairs_swapped(t) * sin_signed`, where sin_signed carries
the minus sign of the even lanes: (-a) * b and a * (-b) are the same IEEE product.

    table = RopeTable.for_model(model, capacity=512, device=device)
    rope = table.slice(offset, 1)          # one decode position
    q_rot = rope.apply(q_SBNh)             # == compat.apply_rope(q_SBNh, emb, config)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.model import compat


@dataclass(frozen=True)
class RopeSlice:
    """cos and sign-folded sin for S consecutive positions, [S, 1, 1, head_dim] fp32."""

    cos_S11h: torch.Tensor
    sin_signed_S11h: torch.Tensor

    def apply(self, t_SBNh: torch.Tensor) -> torch.Tensor:
        """Rotate interleaved pairs of the last dim (fp32 math, cast back to t's dtype)."""
        t = t_SBNh.float()
        swapped = t.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        out = (t * self.cos_S11h) + (swapped * self.sin_signed_S11h)
        return out.to(t_SBNh.dtype)


class RopeTable:
    """cos/sin of the model's RoPE angles for positions [0, capacity) (see module doc)."""

    def __init__(self, emb_S11h: torch.Tensor):
        emb = emb_S11h.float()
        self.capacity = emb.shape[0]
        self.cos_S11h = torch.cos(emb)
        sign = torch.ones(emb.shape[-1], dtype=emb.dtype, device=emb.device)
        sign[0::2] = -1.0
        self.sin_signed_S11h = torch.sin(emb) * sign

    @classmethod
    def for_model(cls, model, capacity: int, device) -> RopeTable:
        """The table of `model` (a RecurrentDepthLM) for positions [0, capacity)."""
        return cls(compat.rope_emb(model.rotary, capacity, 0, torch.device(device)))

    def slice(self, offset: int, length: int) -> RopeSlice:
        end = offset + length
        if end > self.capacity:
            raise ValueError(f"RoPE table: position {end - 1} is past its capacity {self.capacity}")
        return RopeSlice(self.cos_S11h[offset:end], self.sin_signed_S11h[offset:end])
