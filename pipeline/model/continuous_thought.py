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

from typing import NamedTuple

import torch
import torch.nn.functional as F

from pipeline.model.depth import split_steps

FEEDBACKS = ("coda", "core")


class AppendKVCache:
    """A KV cache for differentiable multi-pass forwards: positions are appended by
    concatenation (autograd keeps every earlier tensor intact). Same `update` interface as
    kv_cache.KVCache, which CacheView calls."""

    def __init__(self) -> None:
        self._k: dict[tuple, torch.Tensor] = {}
        self._v: dict[tuple, torch.Tensor] = {}

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
