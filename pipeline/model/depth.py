"""How r core iterations split under truncated backpropagation: the first max(r - k, 0) run
without gradients, the last min(k, r) carry them.

    n_no_grad, n_grad = split_steps(r=32, backprop_depth=8)   # (24, 8)
"""

from __future__ import annotations

from pipeline.common.errors import RdptConfigError


def split_steps(r: int, backprop_depth: int | None) -> tuple[int, int]:
    """(n_no_grad, n_grad) for r iterations with truncated backprop depth k (None = all)."""
    if r < 1:
        raise RdptConfigError(f"r: the number of core iterations must be >= 1, got {r}")
    if backprop_depth is None:
        return 0, r
    if backprop_depth < 1:
        raise RdptConfigError(f"backprop_depth: k must be >= 1, got {backprop_depth}")
    n_grad = min(backprop_depth, r)
    return r - n_grad, n_grad
