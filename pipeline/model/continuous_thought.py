"""Continuous thought (Coconut) for recurrent-depth models: the model's own last hidden state
fed back as the next input vector, one position at a time, with the KV cache reused.

    from pipeline.model.continuous_thought import thought_forward
    out = thought_forward(model, before_ids, n_thoughts=6, after_ids=after, after_mask=trained,
                          r=4, feedback="coda")
    out.loss_sum, out.tokens, out.thoughts_SH       # differentiable through every pass

A sequence is `before` tokens (question ... <|begin_thought|>), n continuous thoughts, then
`after` tokens (<|end_thought|> remaining steps, answer). It is computed in n + 2 passes, as in
Coconut: pass 1 runs `before`; pass j + 1 runs thought j alone, whose input vector (in place of
a token embedding, before the prelude) is the fed-back state of the position before it; the
last pass runs `after`. Every pass attends to all earlier positions through one KV cache
(`AppendKVCache`: keys/values are concatenated, never written in place, so gradients flow
through the cache into earlier passes), and each core iteration i has its own cache slot, so
the result equals running the whole sequence at once (tests/test_coconut.py checks it against
the pass-by-pass recomputation without a cache).

Which state is fed back (`feedback`), for a recurrent-depth model:
- `coda` (default): the coda's output after the final norm, the vector the LM head reads:
  what Coconut feeds back in a standard transformer ("the last hidden state");
- `core`: the latent state s_r after the last core iteration, before the coda: the
  recurrent state itself, so a thought carries what r iterations computed without the coda's
  projection towards the next token.
Either way the vector replaces the embedded token (no sqrt(h) scaling) and goes through the
prelude, then r core iterations like every other position: thoughts and depth compose (c
thoughts at depth r cost c * r core iterations).

The initial latent state of every position is drawn once for the whole sequence (from the
state seed and the sample id, as the model's forward does), so no pass depends on how the
sequence is cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pipeline.model.depth import split_steps

FEEDBACKS = ("coda", "core")


class AppendKVCache:
    """A KV cache for differentiable multi-pass forwards: positions are appended by
    concatenation (autograd keeps every earlier tensor intact). Same `update` interface as
    kv_cache.KVCache, which CacheView calls.

    `starts_B`: for a left-padded batch, the first real position of each sample. The attention
    then hides a sample's padding keys from its real queries (`padding_mask`); a padding query
    sees only itself, so no attention row is empty (an empty row would give NaN, which the
    zero weights of later rows would not remove)."""

    def __init__(self, starts_B=None) -> None:
        self._k: dict[tuple, torch.Tensor] = {}
        self._v: dict[tuple, torch.Tensor] = {}
        self._starts = None if starts_B is None else torch.as_tensor(starts_B).view(-1, 1, 1, 1)
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    def padding_mask(self, offset: int, sq: int) -> torch.Tensor | None:
        """Boolean [B, 1, sq, offset + sq]: query offset + i may see key j (None: no padding)."""
        if self._starts is None:
            return None
        if (offset, sq) not in self._masks:
            dev = self._starts.device
            q = torch.arange(offset, offset + sq, device=dev).view(1, 1, sq, 1)
            k = torch.arange(offset + sq, device=dev).view(1, 1, 1, -1)
            self._masks[(offset, sq)] = (k <= q) & ((k >= self._starts) | (k == q))
        return self._masks[(offset, sq)]

    def update(self, key, k_SBNh, v_SBNh, offset: int):
        have = self._k[key].shape[0] if key in self._k else 0
        if offset != have:
            raise ValueError(f"AppendKVCache {key}: append at {offset}, {have} positions cached")
        if have:
            k_SBNh = torch.cat([self._k[key], k_SBNh])
            v_SBNh = torch.cat([self._v[key], v_SBNh])
        self._k[key], self._v[key] = k_SBNh, v_SBNh
        return k_SBNh, v_SBNh


class PassOutput(NamedTuple):
    state_SBH: torch.Tensor  # s_r, the core state after the last iteration
    hidden_SBH: torch.Tensor  # ln_f(coda(ln_f(s_r))): what the head reads


def run_positions(model, x_SBH, s0_SBH, cache, offset: int, r: int, n_grad=None) -> PassOutput:
    """Prelude, r core iterations (slot i for iteration i; the first r - n_grad without
    gradients) and coda for input vectors x at positions [offset, offset + S)."""
    n_no_grad, n_grad = split_steps(r, n_grad)
    e = model.prelude_embedded(x_SBH, kv_cache=cache, position_offset=offset)
    s = s0_SBH
    with torch.no_grad():
        for i in range(n_no_grad):
            s = model.core_step(s, e, kv_cache=cache, cache_slot=i, position_offset=offset)
    for i in range(n_no_grad, r):
        s = model.core_step(s, e, kv_cache=cache, cache_slot=i, position_offset=offset)
    return PassOutput(s, model.coda_hidden(s, kv_cache=cache, position_offset=offset))


def fed_back(out: PassOutput, feedback: str) -> torch.Tensor:
    """The vector of the last position that becomes the next thought's input [1, B, H]."""
    if feedback not in FEEDBACKS:
        raise ValueError(f"coconut.feedback: one of {FEEDBACKS}, got {feedback!r}")
    src = out.hidden_SBH if feedback == "coda" else out.state_SBH
    return src[-1:]


def initial_states(model, length: int, state_init, seed: int, sample_id: int, like):
    """s_0 for `length` positions of one sample [length, 1, H], drawn once."""
    shape = torch.empty((length, 1, model.cfg.hidden_size), dtype=like.dtype, device=like.device)
    return model.initial_state(shape, state_init, seed, [sample_id])


class ThoughtOutput(NamedTuple):
    loss_sum: torch.Tensor  # summed cross entropy over the trained `after` targets
    tokens: int  # number of trained targets
    thoughts_SH: torch.Tensor  # the n fed-back vectors [n, H]
    logits_SV: torch.Tensor  # [len(after) + 1, V]: row j predicts after[j]; the last row
    # predicts the token after the sequence (generation)
    cache: object  # the KV cache holding every position (generation continues with it)


def thought_forward(
    model,
    before_ids,
    n_thoughts: int,
    after_ids,
    after_mask=None,
    *,
    r: int,
    n_grad: int | None = None,
    feedback: str = "coda",
    state_init: str = "random",
    state_seed: int = 0,
    sample_id: int = 0,
    s0_SBH=None,
) -> ThoughtOutput:
    """One sequence (batch of 1) in n_thoughts + 2 passes; see the module docstring.

    `after_mask[j]`: after_ids[j] is trained as a target (predicted from the position before
    it: the last thought, or the last `before` token). `s0_SBH`: initial states of at least
    every position [>= len, 1, H] (default: drawn for exactly this sequence)."""
    if n_thoughts < 0:
        raise ValueError(f"continuous thoughts: the count must be >= 0, got {n_thoughts}")
    device = model.embedding.weight.device
    before = torch.as_tensor(before_ids, dtype=torch.long, device=device).view(1, -1)
    after = torch.as_tensor(after_ids, dtype=torch.long, device=device).view(1, -1)
    nb, na = before.shape[1], after.shape[1]
    cache = AppendKVCache()
    x = model.embed(before)
    s0 = s0_SBH
    if s0 is None:
        s0 = initial_states(model, nb + n_thoughts + na, state_init, state_seed, sample_id, x)
    out = run_positions(model, x, s0[:nb], cache, 0, r, n_grad)
    thoughts = []
    for j in range(n_thoughts):
        x = fed_back(out, feedback)
        thoughts.append(x[0, 0])
        pos = nb + j
        out = run_positions(model, x, s0[pos : pos + 1], cache, pos, r, n_grad)
    hidden = out.hidden_SBH[-1:]
    if na:
        x = model.embed(after)
        start = nb + n_thoughts
        out = run_positions(model, x, s0[start : start + na], cache, start, r, n_grad)
        hidden = torch.cat([hidden, out.hidden_SBH])
    logits = model.head(hidden)[0]  # [na + 1, V]
    loss_sum, count = torch.zeros((), device=device), 0
    if na and after_mask is not None:
        valid = torch.as_tensor(after_mask, dtype=torch.bool, device=device).view(-1)
        count = int(valid.sum())
        if count:
            loss_sum = F.cross_entropy(logits[:na].float()[valid], after[0][valid], reduction="sum")
    hidden_size = model.cfg.hidden_size
    thoughts_SH = torch.stack(thoughts) if thoughts else torch.zeros((0, hidden_size))
    return ThoughtOutput(loss_sum, count, thoughts_SH, logits, cache)


class ThoughtSequence(NamedTuple):
    """One training example of the Coconut curriculum (training/stages/coconut.py)."""

    before: Sequence[int]  # question (and <|begin_thought|> when n_thoughts > 0)
    n_thoughts: int
    after: Sequence[int]  # (<|end_thought|>) remaining steps, answer
    after_mask: Sequence[bool]  # after[j] is a trained target
    sample_id: int  # draws the initial states, as in thought_forward


def batched_thought_loss(
    model,
    seqs: Sequence[ThoughtSequence],
    *,
    r: int,
    n_grad: int | None = None,
    feedback: str = "coda",
    state_init: str = "random",
    state_seed: int = 0,
    pad_id: int = 0,
) -> tuple[torch.Tensor, int]:
    """(summed cross entropy over the trained targets, their number) of several sequences in
    max(n_thoughts) + 2 passes, each pass batched over the sequences; equal, up to float
    rounding, to the sum of `thought_forward` over them (tests/test_coconut.py).

    The batch is left-padded so that every sequence's first thought sits at the same position
    T0 = max(len(before)) (the layout of the Coconut authors' collator): pass 1 runs positions
    [0, T0), pass j + 1 position T0 + j alone, whose input is the fed-back state of position
    T0 + j - 1 for a sequence that still has a thought there and its own token otherwise, and
    the last pass runs the rest. Padding keys are masked per sequence (AppendKVCache); RoPE is
    relative, so the shift by the padding changes nothing but rounding. Each sequence's initial
    states are drawn for its own positions as `thought_forward` draws them."""
    if not seqs:
        raise ValueError("batched_thought_loss: no sequences")
    device = model.embedding.weight.device
    B = len(seqs)
    t0 = max(len(q.before) for q in seqs)
    n_max = max(q.n_thoughts for q in seqs)
    if min(q.n_thoughts for q in seqs) < 0:
        raise ValueError("continuous thoughts: the count must be >= 0")
    width = t0 + max(q.n_thoughts + len(q.after) for q in seqs)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    targets = torch.full((B, width), -100, dtype=torch.long)
    is_thought = torch.zeros((width, B, 1), dtype=torch.bool)
    starts = []
    for b, q in enumerate(seqs):
        start, first_after = t0 - len(q.before), t0 + q.n_thoughts
        starts.append(start)
        ids[b, start:t0] = torch.as_tensor(q.before, dtype=torch.long)
        after = torch.as_tensor(q.after, dtype=torch.long)
        ids[b, first_after : first_after + len(after)] = after
        is_thought[t0:first_after, b] = True
        trained = torch.as_tensor(q.after_mask, dtype=torch.bool).view(-1)
        # after[j] at position first_after + j is predicted from the position before it
        rows = torch.arange(len(after))[trained] + first_after - 1
        targets[b, rows] = after[trained]
    ids, targets, is_thought = ids.to(device), targets.to(device), is_thought.to(device)
    x = model.embed(ids)  # [W, B, H]
    s0 = None  # [W, B, H]; padding rows stay zero
    for b, q in enumerate(seqs):
        n = len(q.before) + q.n_thoughts + len(q.after)
        init = initial_states(model, n, state_init, state_seed, q.sample_id, x)
        if s0 is None:
            s0 = init.new_zeros((width, B, init.shape[-1]))
        s0[starts[b] : starts[b] + n, b] = init[:, 0]
    cache = AppendKVCache(torch.tensor(starts, device=device))
    out = run_positions(model, x[:t0], s0[:t0], cache, 0, r, n_grad)
    hidden = [out.hidden_SBH]
    for pos in range(t0, t0 + n_max):
        thought = fed_back(out, feedback).to(x.dtype)
        vec = torch.where(is_thought[pos : pos + 1], thought, x[pos : pos + 1])
        out = run_positions(model, vec, s0[pos : pos + 1], cache, pos, r, n_grad)
        hidden.append(out.hidden_SBH)
    if width > t0 + n_max:
        rest = t0 + n_max
        out = run_positions(model, x[rest:], s0[rest:], cache, rest, r, n_grad)
        hidden.append(out.hidden_SBH)
    logits = model.head(torch.cat(hidden))  # [B, W, V]
    count = int((targets >= 0).sum())
    if not count:
        return torch.zeros((), device=device), 0
    loss_sum = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.view(-1), ignore_index=-100,
        reduction="sum",
    )  # fmt: skip
    return loss_sum, count
