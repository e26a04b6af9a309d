"""Loss and perplexity against the recurrence count r, and recurrence telemetry.

One pass per batch runs the prelude once and iterates the core up to max(r), decoding with the
coda only at the requested r (and at every iteration when the per-iteration loss curve is
asked for). Running the core to r=64 once and reading off r in {1, 2, 4, ..., 64} costs 64 core
iterations instead of the 127 that separate forwards would, and gives exactly the same numbers
because the initial state is drawn once per batch from (state_init, seed, sample ids).

Shape legend: S sequence, B batch, H hidden, V vocabulary; the model's latent state is in
megatron layout `s_SBH`, logits come back as `logits_BSV`.

Distributed: every rank evaluates its own batches; sums (loss, token counts, telemetry) are
all-reduced over `group` when torch.distributed is initialised, so every rank returns the
global result.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.model.config import STATE_INITS

IGNORE_INDEX = -100


@dataclass
class DepthSweep:
    """Result of `sweep_depths`: mean next-token loss at each requested r, plus telemetry.

    `telemetry` (when asked for) holds lists indexed by iteration i = 1..max(r):
    `rel_change` = mean over tokens of ||s_i - s_{i-1}|| / ||s_i||, `state_cosine` = mean
    pairwise cosine between the token states of a sequence (near 1 means collapse), and `loss`
    = next-token loss decoded after iteration i (only with `loss_every_iteration`).
    """

    recurrences: list[int]
    loss: dict[int, float]
    tokens: int
    sequences: int
    state_init: str
    seed: int
    telemetry: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ppl(self) -> dict[int, float]:
        return {r: _ppl(v) for r, v in self.loss.items()}

    def to_dict(self) -> dict:
        """JSON-ready: {"r": {"loss", "ppl"}} plus run facts and telemetry."""
        return {
            "recurrences": self.recurrences,
            "state_init": self.state_init,
            "seed": self.seed,
            "tokens": self.tokens,
            "sequences": self.sequences,
            "depth": {
                str(r): {"loss": self.loss[r], "ppl": _ppl(self.loss[r])} for r in self.recurrences
            },
            "telemetry": self.telemetry,
        }


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def check_recurrences(recurrences: Iterable[int]) -> list[int]:
    """Sorted unique list of r; raises ValueError naming the bad value when r <= 0."""
    rs = sorted({int(r) for r in recurrences})
    if not rs:
        raise ValueError("recurrences: at least one recurrence count r is needed")
    bad = [r for r in rs if r <= 0]
    if bad:
        raise ValueError(f"recurrences: r must be >= 1, got {bad[0]}")
    return rs


def check_state_init(state_init: str) -> str:
    if state_init not in STATE_INITS:
        raise ValueError(f"state_init: must be one of {STATE_INITS}, got {state_init!r}")
    return state_init


def unpack_batch(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs_BS, targets_BS, sample_ids_B or None) from a loader micro-batch
    (.inputs/.targets/.sample_ids), an (inputs, targets) or an (inputs, targets, ids) tuple."""
    if hasattr(batch, "inputs"):
        return batch.inputs, batch.targets, getattr(batch, "sample_ids", None)
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    return batch[0], batch[1], None


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def token_nll(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in fp32, 0 where the target is IGNORE_INDEX."""
    V = logits_BSV.shape[-1]
    nll = F.cross_entropy(
        logits_BSV.float().reshape(-1, V),
        targets_BS.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return nll.view_as(targets_BS)


def state_cosine_sum(s_SBH: torch.Tensor) -> torch.Tensor:
    """Sum over sequences of the mean pairwise cosine between distinct token states."""
    S = s_SBH.shape[0]
    if S < 2:
        return s_SBH.new_zeros((), dtype=torch.float64)
    u_SBH = F.normalize(s_SBH.float(), dim=-1)
    total_BH = u_SBH.sum(0)
    # sum_{i != j} u_i . u_j = ||sum u||^2 - sum ||u_i||^2 = ||sum u||^2 - S
    pair_B = (total_BH.pow(2).sum(-1) - S) / (S * (S - 1))
    return pair_B.double().sum()


def rel_change(s_SBH: torch.Tensor, prev_SBH: torch.Tensor) -> torch.Tensor:
    """Per-token ||s_i - s_{i-1}|| / ||s_i||, as [B, S]."""
    num_SB = (s_SBH.float() - prev_SBH.float()).norm(dim=-1)
    den_SB = s_SBH.float().norm(dim=-1).clamp_min(1e-12)
    return (num_SB / den_SB).transpose(0, 1)


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum a tensor over the process group if torch.distributed is initialised (in place)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


class _EvalMode:
    """Context: model.eval() + no_grad, restoring the previous training flag afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        return self

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)
        return False


def sweep_depths(
    model,
    batches: Iterable,
    recurrences: Sequence[int],
    state_init: str = "random",
    seed: int = 0,
    *,
    telemetry: bool = False,
    loss_every_iteration: bool = False,
    group=None,
    progress: bool = False,
) -> DepthSweep:
    """Mean next-token loss at each r in `recurrences` (and optional telemetry) over `batches`.

    Args:
        model: a RecurrentDepthLM (not a DeepSpeed engine: pass `engine.module`).
        batches: iterable of loader micro-batches or (inputs_BS, targets_BS[, sample_ids_B]).
            Targets equal to -100 are ignored.
        recurrences: the r values; each >= 1.
        state_init: "random" (seeded truncated normal, per sample id) or "zero".
        seed: seed of the random initial state.
        telemetry: also record relative state change and state cosine per iteration.
        loss_every_iteration: also decode after every iteration (telemetry["loss"]).
        group: process group for the all-reduce (default: the world).
        progress: show a progress bar over batches.
    """
    rs = check_recurrences(recurrences)
    check_state_init(state_init)
    max_r = rs[-1]
    device = model_device(model)
    want = set(rs)
    # Layout of the packed sums: [loss at each r | tokens | sequences | telemetry rows].
    n_tel = max_r if telemetry or loss_every_iteration else 0
    sums = torch.zeros(len(rs) + 2 + 3 * n_tel, dtype=torch.float64, device=device)
    tel_base = len(rs) + 2
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="eval", unit="batch", leave=False)
    with _EvalMode(model):
        for batch in it:
            inputs_BS, targets_BS, ids_B = unpack_batch(batch)
            inputs_BS = inputs_BS.to(device, non_blocking=True)
            targets_BS = targets_BS.to(device, non_blocking=True)
            if ids_B is not None:
                ids_B = ids_B.to(device)
            mask_BS = targets_BS != IGNORE_INDEX
            n_tok = mask_BS.sum()
            sums[len(rs)] += n_tok.double()
            sums[len(rs) + 1] += inputs_BS.shape[0]
            e_SBH = model.prelude(inputs_BS)
            s_SBH = model.initial_state(e_SBH, state_init, seed, ids_B)
            for i in range(1, max_r + 1):
                prev_SBH = s_SBH
                s_SBH = model.core_step(s_SBH, e_SBH, cache_slot=i - 1)
                if n_tel:
                    row = tel_base + 3 * (i - 1)
                    if telemetry:
                        sums[row] += (rel_change(s_SBH, prev_SBH) * mask_BS).sum().double()
                        sums[row + 1] += state_cosine_sum(s_SBH)
                if i in want or loss_every_iteration:
                    nll = token_nll(model.coda(s_SBH), targets_BS).sum().double()
                    if i in want:
                        sums[rs.index(i)] += nll
                    if loss_every_iteration:
                        sums[tel_base + 3 * (i - 1) + 2] += nll
    all_reduce_sum(sums, group)
    tokens = int(sums[len(rs)].item())
    seqs = int(sums[len(rs) + 1].item())
    denom = max(tokens, 1)
    loss = {r: float(sums[k].item()) / denom for k, r in enumerate(rs)}
    tel: dict[str, list[float]] = {}
    if n_tel:
        rows = sums[tel_base:].view(max_r, 3).cpu()
        tel["iteration"] = list(range(1, max_r + 1))
        if telemetry:
            tel["rel_change"] = (rows[:, 0] / denom).tolist()
            tel["state_cosine"] = (rows[:, 1] / max(seqs, 1)).tolist()
        if loss_every_iteration:
            tel["loss"] = (rows[:, 2] / denom).tolist()
    return DepthSweep(rs, loss, tokens, seqs, state_init, seed, tel)


def evaluate_depths(
    model,
    batches: Iterable,
    recurrences: Sequence[int],
    state_init: str = "random",
    seed: int = 0,
    *,
    group=None,
) -> dict[int, float]:
    """{r: mean next-token loss} over `batches`; the cheap call training makes every N steps.

    One core pass to max(r) per batch, coda only at the requested r; eval mode and no_grad
    inside (the model's training flag is restored). All-reduced over `group` when
    torch.distributed is initialised, so give each DP rank its own slice of the batches.
    """
    return sweep_depths(model, batches, recurrences, state_init, seed, group=group).loss
