"""Per-token adaptive exit: stop iterating a position once its prediction has converged.

After every core iteration i (i = 1..max_r) each still-active position computes a criterion:
- "kl":      KL(p_i || p_{i-1}) between the next-token distributions of two successive
             iterations (p_0 is decoded from the initial state), the paper's rule (5e-4);
- "entropy": the entropy of p_i (nats): exit once the model is confident;
- "state":   ||s_i - s_{i-1}|| / ||s_i||: exit once the latent state stops moving (no coda
             needed for the decision);
- "gate":    1 - p_exit(s_i) of the learned exit gate (model.exit_gate, trained by
             train.stage=exit_gate; pipeline/model/exit_gate.py): exit once the gate's
             probability of continuing falls below the threshold (0.5: exit is more likely).
A position exits at the first i where the criterion is strictly below the threshold, or at
max_r. From then on its state is frozen (other positions still attend to it, as in
generation) and its prediction is the one made at exit. Threshold 0 therefore never exits early
(= fixed max_r) and a huge threshold exits every position after one iteration.

Compute is counted in core iterations (the dominant cost): mean exit depth against the
smallest fixed r whose loss is at most the adaptive loss ("compute saved at equal loss").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.eval.depth import (
    IGNORE_INDEX,
    _EvalMode,
    all_reduce_sum,
    check_state_init,
    model_device,
    rel_change,
    sweep_depths,
    unpack_batch,
)

CRITERIA = ("kl", "entropy", "state", "gate")
DEFAULT_THRESHOLD = 5e-4


@dataclass(frozen=True)
class ExitRule:
    """Adaptive-exit rule: `criterion` in CRITERIA, exit when it falls below `threshold`."""

    criterion: str = "kl"
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise ValueError(f"exit criterion: must be one of {CRITERIA}, got {self.criterion!r}")
        if not self.threshold >= 0:
            raise ValueError(f"exit threshold: must be >= 0, got {self.threshold}")


@dataclass
class TokenScores:
    """Per-position results of `score_tokens`, all [B, S]."""

    logprob: torch.Tensor  # log p(target) from the prediction used (at exit), fp32
    greedy: torch.Tensor  # bool: target == argmax of that prediction
    depth: torch.Tensor  # int: iterations spent (exit depth)


def needs_logits(rule: ExitRule | None) -> bool:
    """Whether the rule decides from the next-token distribution (the coda after every
    iteration) rather than from the state alone."""
    return rule is not None and rule.criterion in ("kl", "entropy")


def check_rule(model, rule: ExitRule | None) -> None:
    """RdptConfigError when the rule cannot run on this model (criterion gate, no gate)."""
    if rule is not None and rule.criterion == "gate" and getattr(model, "exit_gate", None) is None:
        from pipeline.common.errors import RdptConfigError

        raise RdptConfigError(
            "--exit-criterion gate: this model has no exit gate (model.exit_gate: false); train "
            "one first: rdpt train CONFIG train.stage=exit_gate model.exit_gate=true "
            "model.init_from=RUN"
        )


def criterion_value(
    rule: ExitRule, logp_BSV, prev_logp_BSV, s_SBH, prev_SBH, model=None
) -> torch.Tensor:
    """The exit criterion per position, [B, S], clamped at 0 (`model`: for the gate)."""
    if rule.criterion == "kl":
        val = (logp_BSV.exp() * (logp_BSV - prev_logp_BSV)).sum(-1)
    elif rule.criterion == "entropy":
        val = -(logp_BSV.exp() * logp_BSV).sum(-1)
    elif rule.criterion == "gate":
        val = torch.sigmoid(-model.exit_logits(s_SBH))  # p_continue = 1 - p_exit
    else:
        val = rel_change(s_SBH, prev_SBH)
    return val.clamp_min(0.0)


def score_tokens(
    model,
    inputs_BS: torch.Tensor,
    targets_BS: torch.Tensor,
    *,
    max_r: int,
    rule: ExitRule | None = None,
    state_init: str = "zero",
    seed: int = 0,
    sample_ids_B: torch.Tensor | None = None,
) -> TokenScores:
    """Log-probability of each target at fixed r = max_r (rule None) or with adaptive exit.

    Call under no_grad/eval (`evaluate_adaptive` and the lm-eval adapter do). Targets equal to
    IGNORE_INDEX get logprob 0.
    """
    if max_r < 1:
        raise ValueError(f"max_r: must be >= 1, got {max_r}")
    check_rule(model, rule)
    from pipeline.model.lean_forward import LeanForward
    from pipeline.model.rope_table import RopeTable

    targets_safe_BS = targets_BS.clamp_min(0)
    B, S = inputs_BS.shape
    # the decode loop's lean pieces (decode.py), without a cache: RoPE once, layers directly
    lean = LeanForward(model)
    rope = RopeTable.for_model(model, S, inputs_BS.device).slice(0, S)
    e_SBH = lean.prelude(inputs_BS, rope)
    s_SBH = model.initial_state(e_SBH, state_init, seed, sample_ids_B)
    adapter_in = lean.adapter_input(e_SBH)
    if rule is None:
        for _ in range(max_r):
            s_SBH = lean.core(s_SBH, adapter_in, rope)
        logp_BSV = F.log_softmax(lean.coda(s_SBH, rope).float(), dim=-1)
        logprob = logp_BSV.gather(-1, targets_safe_BS[..., None])[..., 0]
        greedy = logp_BSV.argmax(-1) == targets_BS
        depth = torch.full((B, S), max_r, dtype=torch.long, device=inputs_BS.device)
    else:
        prev_logp = None
        if needs_logits(rule):
            prev_logp = F.log_softmax(lean.coda(s_SBH, rope).float(), dim=-1)
        active_BS = torch.ones(B, S, dtype=torch.bool, device=inputs_BS.device)
        logprob = torch.zeros(B, S, dtype=torch.float32, device=inputs_BS.device)
        greedy = torch.zeros(B, S, dtype=torch.bool, device=inputs_BS.device)
        depth = torch.full((B, S), max_r, dtype=torch.long, device=inputs_BS.device)
        for i in range(1, max_r + 1):
            prev_SBH = s_SBH
            new_SBH = lean.core(s_SBH, adapter_in, rope)
            # NOTE: exited positions keep their state; layout is [S, B, H] vs mask [B, S].
            s_SBH = torch.where(active_BS.transpose(0, 1)[..., None], new_SBH, prev_SBH)
            logp = F.log_softmax(lean.coda(s_SBH, rope).float(), dim=-1)
            val = criterion_value(rule, logp, prev_logp, s_SBH, prev_SBH, model)
            exit_BS = active_BS & ((val < rule.threshold) | (i == max_r))
            if exit_BS.any():
                logprob = torch.where(
                    exit_BS, logp.gather(-1, targets_safe_BS[..., None])[..., 0], logprob
                )
                greedy = torch.where(exit_BS, logp.argmax(-1) == targets_BS, greedy)
                depth = torch.where(exit_BS, torch.full_like(depth, i), depth)
                active_BS = active_BS & ~exit_BS
            prev_logp = logp
            if not active_BS.any():
                break
    ignore = targets_BS == IGNORE_INDEX
    return TokenScores(logprob.masked_fill(ignore, 0.0), greedy & ~ignore, depth)


@dataclass
class AdaptiveResult:
    """Adaptive exit over a dataset against the fixed-r loss curve (same data, init and seed)."""

    criterion: str
    threshold: float
    max_r: int
    loss: float
    tokens: int
    mean_depth: float
    histogram: list[int]  # histogram[d - 1] = number of tokens that exited after d iterations
    fixed_loss: list[float]  # fixed_loss[r - 1] = loss at fixed r, r = 1..max_r
    equal_loss_r: int | None  # smallest fixed r with loss <= adaptive loss (None: none is)
    compute_saved: float | None  # 1 - mean_depth / equal_loss_r
    compute_saved_vs_max_r: float  # 1 - mean_depth / max_r

    def to_dict(self) -> dict:
        return {
            "criterion": self.criterion,
            "threshold": self.threshold,
            "max_r": self.max_r,
            "loss": self.loss,
            "ppl": math.exp(min(self.loss, 700.0)),
            "tokens": self.tokens,
            "mean_depth": self.mean_depth,
            "histogram": {str(d + 1): c for d, c in enumerate(self.histogram) if c},
            "fixed_loss": self.fixed_loss,
            "equal_loss_r": self.equal_loss_r,
            "compute_saved": self.compute_saved,
            "compute_saved_vs_max_r": self.compute_saved_vs_max_r,
        }


def equal_loss_depth(fixed_loss: list[float], loss: float, rtol: float = 1e-6) -> int | None:
    """Smallest r (1-based) whose fixed-r loss is at most `loss` (relative tolerance rtol)."""
    for r, fl in enumerate(fixed_loss, start=1):
        if fl <= loss + rtol * abs(loss):
            return r
    return None


def evaluate_adaptive(
    model,
    batches: Iterable,
    *,
    rule: ExitRule = ExitRule(),
    max_r: int = 64,
    state_init: str = "random",
    seed: int = 0,
    fixed_curve: list[float] | None = None,
    group=None,
    progress: bool = False,
) -> AdaptiveResult:
    """Loss with per-token adaptive exit, exit-depth histogram and compute saved.

    `batches` must be re-iterable (a list) unless `fixed_curve` (loss at r = 1..max_r, e.g. the
    `telemetry["loss"]` of `sweep_depths(..., loss_every_iteration=True)` on the same data) is
    given; otherwise that curve is computed here first.
    """
    if max_r < 1:
        raise ValueError(f"max_r: must be >= 1, got {max_r}")
    check_state_init(state_init)
    check_rule(model, rule)
    if fixed_curve is None:
        sweep = sweep_depths(
            model,
            batches,
            range(1, max_r + 1),
            state_init,
            seed,
            group=group,
            loss_every_iteration=True,
            progress=progress,
        )
        fixed_curve = sweep.telemetry["loss"]
    if len(fixed_curve) < max_r:
        raise ValueError(f"fixed_curve: need losses for r = 1..{max_r}, got {len(fixed_curve)}")
    device = model_device(model)
    # packed sums: [nll | tokens | depth sum | histogram (max_r)]
    sums = torch.zeros(3 + max_r, dtype=torch.float64, device=device)
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=f"adaptive exit ({rule.criterion})", unit="batch", leave=False)
    with _EvalMode(model):
        for batch in it:
            inputs_BS, targets_BS, ids_B = unpack_batch(batch)
            inputs_BS, targets_BS = inputs_BS.to(device), targets_BS.to(device)
            ids_B = ids_B.to(device) if ids_B is not None else None
            sc = score_tokens(
                model,
                inputs_BS,
                targets_BS,
                max_r=max_r,
                rule=rule,
                state_init=state_init,
                seed=seed,
                sample_ids_B=ids_B,
            )
            mask = targets_BS != IGNORE_INDEX
            sums[0] -= sc.logprob[mask].double().sum()
            sums[1] += mask.sum()
            sums[2] += sc.depth[mask].double().sum()
            sums[3:] += torch.bincount(sc.depth[mask] - 1, minlength=max_r)[:max_r].double()
    all_reduce_sum(sums, group)
    tokens = int(sums[1].item())
    loss = float(sums[0].item()) / max(tokens, 1)
    mean_depth = float(sums[2].item()) / max(tokens, 1)
    fixed = [float(x) for x in fixed_curve[:max_r]]
    r_eq = equal_loss_depth(fixed, loss)
    return AdaptiveResult(
        criterion=rule.criterion,
        threshold=rule.threshold,
        max_r=max_r,
        loss=loss,
        tokens=tokens,
        mean_depth=mean_depth,
        histogram=[int(x) for x in sums[3:].tolist()],
        fixed_loss=fixed,
        equal_loss_r=r_eq,
        compute_saved=(1.0 - mean_depth / r_eq) if r_eq else None,
        compute_saved_vs_max_r=1.0 - mean_depth / max_r,
    )


# thresholds of the loss-against-mean-depth curve, per criterion (kl and entropy in nats;
# gate: the probability of continuing); the gate's only where the model has one
CURVE_THRESHOLDS = {
    "kl": (1e-1, 3e-2, 1e-2, 1e-3, 1e-4),
    "entropy": (4.0, 2.0, 1.0, 0.5, 0.1),
    "state": (3e-1, 1e-1, 3e-2, 1e-2, 1e-3),
    "gate": (0.9, 0.7, 0.5, 0.3, 0.1),
}


def curve_thresholds(model) -> dict[str, tuple[float, ...]]:
    """CURVE_THRESHOLDS for the criteria this model can run."""
    has_gate = getattr(model, "exit_gate", None) is not None
    return {c: t for c, t in CURVE_THRESHOLDS.items() if c != "gate" or has_gate}


def exit_curves(
    model,
    batches,
    *,
    max_r: int,
    fixed_curve: list[float],
    state_init: str = "random",
    seed: int = 0,
    thresholds: dict[str, tuple[float, ...]] | None = None,
    group=None,
) -> dict[str, list[dict]]:
    """Loss against mean exit depth for every criterion, one point per threshold:
    {criterion: [{threshold, loss, mean_depth, equal_loss_r, compute_saved, ...}]}, each point
    an `evaluate_adaptive` on the same batches against the same fixed-r curve (default
    thresholds: CURVE_THRESHOLDS, the gate's where the model has one). `batches` must be
    re-iterable (a list)."""
    out: dict[str, list[dict]] = {}
    for criterion, values in (thresholds or curve_thresholds(model)).items():
        points = []
        for threshold in values:
            res = evaluate_adaptive(
                model,
                batches,
                rule=ExitRule(criterion, threshold),
                max_r=max_r,
                state_init=state_init,
                seed=seed,
                fixed_curve=fixed_curve,
                group=group,
            )
            d = res.to_dict()
            points.append({k: d[k] for k in d if k not in ("fixed_loss", "histogram")})
        out[criterion] = points
    return out
