"""The learned exit gate: after core iteration i, the probability that position t may stop.

    p_exit(s_i) = sigmoid(w . rmsnorm(s_i) + b)        # model.exit_gate: true

A recurrent-depth model can stop iterating a position once more iterations no longer help
(pipeline/eval/adaptive.py). The hand-made criteria (KL of successive predictions, entropy,
state change) need the coda, or only watch the state move; a gate (as in looped LMs such as
Ouro, Zhu et al. 2025) learns the decision from the state itself, for 2h + 1 parameters and
one dot product per position and iteration.

Training (train.stage=exit_gate, training/stages/exit_gate.py) freezes the language model and
fits only the gate. Its target says how much the next iteration still lowers the loss:

    CE_i(t)  = cross entropy of position t's target, decoded after iteration i (i = 1..r)
    gain_i   = CE_i - CE_{i+1}                          (exit_gate.target: next)
             = CE_i - min_{j > i} CE_j                  (exit_gate.target: remaining)
    y_i      = sigmoid(sharpness * (min_gain - gain_i))  the exit target, in (0, 1)

so y_i is near 1 where another iteration gains less than exit_gate.min_gain nats, near 0 where
it gains clearly more, and the gate is fitted with binary cross entropy at i = 1..r-1 (at r the
model stops anyway; exit_gate.balance weights the two classes equally).
`--exit-criterion gate --threshold T` exits once p_continue = 1 - p_exit < T (threshold 0.5:
exit when the gate says exit is more likely).

The gate's parameters are created frozen (requires_grad False): every stage except exit_gate
leaves them as they are. The gate is replicated under tensor parallelism (the state is whole
on every TP rank) and costs 2h FLOPs per position and iteration, which FLOP counts ignore.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.model.layers import RMSNorm


class ExitGate(torch.nn.Module):
    """p_exit = sigmoid(w . rmsnorm(s) + b) per position; see the module docstring."""

    def __init__(self, hidden_size: int, eps: float, params_dtype, init_std: float):
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps=eps, params_dtype=params_dtype)
        self.proj = torch.nn.Linear(hidden_size, 1, bias=True, dtype=params_dtype)
        with torch.no_grad():
            self.proj.weight.normal_(0.0, init_std)
            self.proj.bias.zero_()  # p_exit = 0.5 everywhere before training, up to init noise
        for p in self.parameters():
            p.requires_grad_(False)  # trained by train.stage=exit_gate only

    def forward(self, s_SBH: torch.Tensor) -> torch.Tensor:
        """Exit logits [B, S] (fp32) of states [S, B, H]."""
        x = self.norm(s_SBH.to(self.proj.weight.dtype))
        return F.linear(x, self.proj.weight, self.proj.bias)[..., 0].float().transpose(0, 1)


TARGETS = ("next", "remaining")


def exit_targets(ce_RBS: torch.Tensor, target: str, min_gain: float, sharpness: float):
    """Soft exit targets y_i [r - 1, B, S] from per-iteration cross entropies [r, B, S]
    (i = 1..r-1; module docstring)."""
    if target not in TARGETS:
        raise ValueError(f"exit_gate.target: one of {TARGETS}, got {target!r}")
    ce = ce_RBS.float()
    if target == "next":
        later = ce[1:]
    else:  # the best loss any later iteration reaches: reverse cumulative minimum
        later = torch.flip(torch.cummin(torch.flip(ce[1:], [0]), dim=0).values, [0])
    gain = ce[:-1] - later
    return torch.sigmoid(sharpness * (min_gain - gain))
