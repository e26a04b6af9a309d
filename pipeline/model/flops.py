"""FLOPs per token of a recurrent-depth training step: model FLOPs (what the model must
compute, counted per matmul as 2 x multiply-adds), the basis of every MFU figure in rdpt.

Per token, forward, one layer of width d, SwiGLU width f, causal attention over S:
    F_layer = 2 * (4 d^2 + 3 d f) + 2 S d
A training step with r iterations, the last k with gradients (n = r - k without):
    F_token = 3 (L_prelude + L_coda) F_layer + 3 * 2 d V + (3 k + n) (L_core F_layer + 4 d^2)
Model FLOPs only: no credit for activation recompute.
"""

from __future__ import annotations

from pipeline.model.config import ModelConfig
from pipeline.model.depth import split_steps


def layer_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of one decoder layer."""
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    return 2 * (4 * d * d + 3 * d * f) + 2 * seq_len * d


def flops_per_token(cfg: ModelConfig, r: int, k: int | None, seq_len: int) -> int:
    """Training (forward + backward) FLOPs per token for r iterations, the last k graded
    (k None = all r)."""
    n_no_grad, n_grad = split_steps(r, k)
    d, V = cfg.hidden_size, cfg.vocab_size
    fl = layer_flops(cfg, seq_len)
    once = 3 * (cfg.n_prelude + cfg.n_coda) * fl + 3 * 2 * d * V
    per_iteration = cfg.n_core * fl + 4 * d * d
    return once + (3 * n_grad + n_no_grad) * per_iteration


def forward_flops_per_token(cfg: ModelConfig, r: int, seq_len: int) -> int:
    """Inference (forward only) FLOPs per token with r iterations."""
    d, V = cfg.hidden_size, cfg.vocab_size
    fl = layer_flops(cfg, seq_len)
    return (cfg.n_prelude + cfg.n_coda) * fl + 2 * d * V + r * (cfg.n_core * fl + 4 * d * d)
