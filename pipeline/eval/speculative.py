"""Self-speculative decoding: the model drafts with few iterations and checks with all of them.

A recurrent-depth model is its own draft model: the same weights at DRAFT_R < r iterations.
One round, from a next token t0 that is already certain (greedy at the full r):

1. draft: feed t0, d1, ..., d_{N-1} one at a time at DRAFT_R iterations; d_j = argmax;
2. verify: one pass over the N + 1 positions [t0, d1, ..., dN] at the full r (a chunk, like
   the prompt prefill): y_1..y_{N+1} are the full-r greedy tokens after each;
3. accept the drafts while d_j == y_j; the first y_j that disagrees (or y_{N+1} when all
   agree) is the next certain token. So every round yields 1..N+1 tokens, all of them exactly
   the tokens plain greedy decoding at the full r gives (tests/test_speculative.py checks it).

The verification pass writes every verified position's cache entries at the full r, over what
the drafts wrote (the cache is position-indexed); entries of rejected positions are rewritten
when those positions are decoded again. Greedy only, fixed r, zero initial state, a KV budget
>= r and no continuous chain of thought: otherwise a chunk at the full r would not compute what
position-by-position decoding computes, and outputs could differ.

    spec = Speculation.parse("4:3")       # DRAFT_R 4, N 3 drafts per round
    res = generate_speculative(model, prompt_ids, GenerationConfig(r=32), spec)
    res.new_ids, res.stats.acceptance_rate, res.stats.compute_speedup
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from pipeline.eval.depth import _EvalMode, model_device


@dataclass(frozen=True)
class Speculation:
    """Draft `n` tokens per round with `draft_r` iterations each."""

    draft_r: int
    n: int

    @classmethod
    def parse(cls, text: str) -> Speculation:
        """'DRAFT_R:N' -> Speculation; ValueError naming the problem otherwise."""
        parts = str(text).split(":")
        try:
            draft_r, n = (int(p) for p in parts)
        except ValueError:
            raise ValueError(
                f"--speculate: expected DRAFT_R:N (two integers, e.g. 4:3), got {text!r}"
            ) from None
        return cls(draft_r, n)

    def check(self, cfg) -> None:
        """Raise ValueError when this speculation cannot reproduce plain greedy under cfg."""
        if self.n < 1:
            raise ValueError(f"--speculate: N (drafts per round) must be >= 1, got {self.n}")
        if not 1 <= self.draft_r < cfg.r:
            raise ValueError(
                f"--speculate: DRAFT_R must be in 1..r-1 = 1..{cfg.r - 1} (drafts use fewer "
                f"iterations than the full r = {cfg.r}), got {self.draft_r}"
            )
        conflicts = [
            name
            for name, bad in (
                ("sampling (temperature > 0)", cfg.temperature > 0),
                ("adaptive exit", cfg.exit_rule is not None),
                ("continuous CoT", cfg.continuous_cot),
                ("a random initial state", cfg.state_init != "zero"),
                ("a KV budget below r", cfg.kv_budget is not None and cfg.kv_budget < cfg.r),
            )
            if bad
        ]
        if conflicts:
            raise ValueError(
                "--speculate: self-speculative decoding is greedy at a fixed r with a zero "
                f"initial state; it cannot be combined with {', '.join(conflicts)}"
            )


@dataclass
class SpeculationStats:
    draft_r: int
    n: int
    r: int
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    core_iterations: int = 0  # per sequence position, as spent (drafts + verification passes)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def to_dict(self, new_tokens: int) -> dict:
        # plain greedy: the prefill pass, then one full-r step per further token
        plain = self.r * new_tokens
        return {
            **asdict(self),
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_round": (new_tokens - 1) / self.rounds if self.rounds else 0.0,
            "core_iterations_plain": plain,
            "compute_speedup": plain / self.core_iterations if self.core_iterations else 0.0,
        }


@dataclass
class SpeculativeResult:
    prompt_ids: list[int]
    new_ids: list[int]
    stats: SpeculationStats
    seconds: float = 0.0
    prefill_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.new_ids) / self.seconds if self.seconds > 0 else 0.0


def generate_speculative(
    model, prompt_ids: Sequence[int], cfg, spec: Speculation
) -> SpeculativeResult:
    """Greedy generation at cfg.r by self-speculative decoding (module doc); one sequence.

    core_iterations counts sequential core passes (a verification pass over N + 1 positions
    counts r, like one decode step: it is one pass of the same layers over a longer input)."""
    from pipeline.eval.decode import DecodeLoop

    spec.check(cfg)
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("prompt: at least one token is needed (e.g. the end-of-text id)")
    device = model_device(model)
    stop = set(int(t) for t in cfg.stop_ids)
    stats = SpeculationStats(spec.draft_r, spec.n, cfg.r)
    out: list[int] = []
    with _EvalMode(model):
        t0 = time.perf_counter()
        capacity = len(prompt) + cfg.max_new_tokens + spec.n + 1
        loop = DecodeLoop(model, cfg, batch=1, capacity=capacity, device=device)
        ids = torch.tensor([prompt], device=device)
        logits_BV, _, _ = loop.step(ids, 0, None, adaptive=False)
        prefill_s = time.perf_counter() - t0
        offset = len(prompt)  # position of `tok`, certain but not fed yet
        tok = int(logits_BV[0].argmax())
        out.append(tok)
        while len(out) < cfg.max_new_tokens and tok not in stop:
            drafts: list[int] = []
            t = tok
            for j in range(min(spec.n, cfg.max_new_tokens - len(out))):
                ids = torch.tensor([[t]], device=device)
                lg, _, _ = loop.step(ids, offset + j, None, False, r=spec.draft_r)
                t = int(lg[0].argmax())
                drafts.append(t)
            chunk = torch.tensor([[tok, *drafts]], device=device)
            logits_BSV, _, _ = loop.step(chunk, offset, None, False, all_positions=True)
            ys = logits_BSV[0].argmax(-1).tolist()
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == ys[accepted]:
                accepted += 1
            stats.rounds += 1
            stats.drafted += len(drafts)
            stats.accepted += accepted
            stats.core_iterations += len(drafts) * spec.draft_r + cfg.r
            for new in ys[: accepted + 1]:
                out.append(new)
                tok = new
                if new in stop or len(out) == cfg.max_new_tokens:
                    break
            offset += accepted + 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    stats.core_iterations += cfg.r  # the prefill pass
    return SpeculativeResult(prompt, out, stats, seconds, prefill_s)
