"""The training loss without full-vocabulary fp32 logits: cross entropy over chunks of tokens.

    loss_SB = chunked_cross_entropy(logits_fn, x_SBH, labels_SB, chunk_tokens=2048)
    loss_SB = unfused_cross_entropy(logits_fn, x_SBH, labels_SB)   # the reference

`logits_fn(x) -> logits [.., V/tp]` is the model's head (vocab-parallel under TP: each rank
holds its slice of the vocabulary and megatron's vocab_parallel_cross_entropy combines the
ranks). Unfused, the head's output for a whole micro-batch sits in memory in the compute dtype
plus an fp32 copy (B x S x V/tp x 6 bytes: 3 GB at micro-batch 2, sequence 4096, vocabulary
65536), and autograd keeps it for backward. Chunked, the tokens go through head + loss in
slices of `chunk_tokens` tokens, each under activation checkpointing: only a slice's logits
exist at a time, in forward and again in backward, where the slice is recomputed (one extra
head matmul per token, ~2 d V FLOPs, not counted in MFU). Loss and gradients are those of the
unfused loss up to summation order (tests/test_loss_chunked.py: 1e-6 in fp32, TP 1 and 2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core import tensor_parallel
from torch.utils.checkpoint import checkpoint


def _slice_loss(logits_fn: Callable, x_SBH: torch.Tensor, labels_SB: torch.Tensor):
    logits = logits_fn(x_SBH)
    return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels_SB)


def unfused_cross_entropy(logits_fn: Callable, x_SBH, labels_SB) -> torch.Tensor:
    """Per-token cross entropy [S, B] (fp32) from the full logits of the micro-batch."""
    return _slice_loss(logits_fn, x_SBH, labels_SB)


def chunked_cross_entropy(
    logits_fn: Callable, x_SBH: torch.Tensor, labels_SB: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Per-token cross entropy [S, B] (fp32), computed `chunk_tokens` tokens at a time (whole
    sequence positions: S is sliced, every slice holds all B samples)."""
    S, B = labels_SB.shape
    rows = max(1, chunk_tokens // max(B, 1))
    if rows >= S:
        return unfused_cross_entropy(logits_fn, x_SBH, labels_SB)
    losses = []
    for start in range(0, S, rows):
        x = x_SBH[start : start + rows]
        y = labels_SB[start : start + rows]
        if torch.is_grad_enabled():
            losses.append(checkpoint(_slice_loss, logits_fn, x, y, use_reentrant=False))
        else:
            losses.append(_slice_loss(logits_fn, x, y))
    return torch.cat(losses, dim=0)
