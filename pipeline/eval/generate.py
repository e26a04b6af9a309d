"""Text generation for recurrent-depth models with a KV cache.

- Sampling: greedy (temperature 0), temperature, nucleus (top-p).
- Depth: a fixed r per token, or adaptive exit per generated token (`ExitRule`) up to r.
- Huginn KV-cache sharing: the cache holds `kv_budget` slots per core layer and iteration i
  (0-based) writes slot i mod kv_budget, so memory is constant in r. With kv_budget >= r every
  iteration has its own slot and generation equals the uncached recomputation.
- Continuous chain of thought: a new position's initial state is the previous position's final
  state instead of noise / zeros, so fewer iterations are needed to converge.

The prompt is prefilled in one chunk at the full r; adaptive exit applies to generated tokens.
When a token exits after i < kv_budget iterations, its entries in the slots it never wrote are
filled with its last written entry, so later tokens always find a key/value for every earlier
position (the reference implementation's "latest entry" fallback).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.eval.adaptive import ExitRule, criterion_value
from pipeline.eval.depth import _EvalMode, check_state_init, model_device


@dataclass
class GenerationConfig:
    """How to generate; see the module docstring."""

    max_new_tokens: int = 64
    r: int = 32  # fixed r per token, or the maximum r with adaptive exit
    exit_rule: ExitRule | None = None
    kv_budget: int | None = None  # slots per core layer; None: one per iteration (no sharing)
    continuous_cot: bool = False
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    state_init: str = "zero"
    seed: int = 0
    stop_ids: Sequence[int] = ()

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"r: the number of core iterations must be >= 1, got {self.r}")
        if self.kv_budget is not None and self.kv_budget < 1:
            raise ValueError(f"kv_budget: must be >= 1, got {self.kv_budget}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be >= 0, got {self.max_new_tokens}")
        check_state_init(self.state_init)

    @property
    def slots(self) -> int:
        return self.kv_budget or self.r


@dataclass
class GenerationResult:
    """Generated ids (without the prompt), iterations spent on each, and timing."""

    prompt_ids: list[int]
    new_ids: list[int]
    depths: list[int] = field(default_factory=list)
    seconds: float = 0.0
    prefill_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of the whole call (prefill included)."""
        return len(self.new_ids) / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_depth(self) -> float:
        return sum(self.depths) / len(self.depths) if self.depths else 0.0

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": len(self.prompt_ids),
            "new_tokens": len(self.new_ids),
            "new_ids": self.new_ids,
            "depths": self.depths,
            "mean_depth": self.mean_depth,
            "seconds": self.seconds,
            "prefill_seconds": self.prefill_seconds,
            "tokens_per_s": self.tokens_per_s,
        }


def sample_next(
    logits_BV: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B]: argmax at temperature 0, else temperature + nucleus sampling."""
    if temperature <= 0:
        return logits_BV.argmax(-1)
    probs_BV = F.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs_BV.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, order, sorted_p)
    gen_device = generator.device if generator is not None else probs_BV.device
    idx = torch.multinomial(probs_BV.to(gen_device), 1, generator=generator)[:, 0]
    return idx.to(logits_BV.device)


def new_kv_cache():
    """An empty KV cache (keyed by (block, slot, layer); slots are created on first write)."""
    from pipeline.model.kv_cache import KVCache

    return KVCache()


def fill_unwritten_slots(cache, offset: int, written: int, last_slot: int) -> None:
    """A token at `offset` exited after writing core slots 0..written-1: give it an entry in
    slots written..last_slot-1 too, a copy of its last one (slot written-1), so later tokens
    find a key/value for every earlier position in every slot."""
    for block, slot, layer in list(cache.keys()):
        if block != "core" or slot != written - 1:
            continue
        k_all, v_all = cache.get((block, slot, layer))
        k_SBNh, v_SBNh = k_all[offset : offset + 1], v_all[offset : offset + 1]
        for dst_slot in range(written, last_slot):
            cache.update((block, dst_slot, layer), k_SBNh, v_SBNh, offset)


def _run_chunk(model, ids_BS, cache, offset: int, cfg: GenerationConfig, warm_SBH, adaptive: bool):
    """Prelude + core iterations + coda for new positions at `offset`.

    Returns (logits of the last position [B, V], final state of the last position [1, B, H],
    iterations spent)."""
    e_SBH = model.prelude(ids_BS, kv_cache=cache, position_offset=offset)
    if warm_SBH is not None:
        s_SBH = warm_SBH.expand_as(e_SBH).contiguous() if e_SBH.shape[0] == 1 else warm_SBH
    else:
        s_SBH = model.initial_state(e_SBH, cfg.state_init, cfg.seed + offset, None)
    rule = cfg.exit_rule if adaptive else None
    prev_logp = None
    if rule is not None and rule.criterion != "state":
        prev_logp = F.log_softmax(
            model.coda(s_SBH, kv_cache=cache, position_offset=offset).float(), -1
        )
    depth = cfg.r
    logits_BSV = None
    for i in range(1, cfg.r + 1):
        prev_SBH = s_SBH
        s_SBH = model.core_step(
            s_SBH, e_SBH, kv_cache=cache, cache_slot=(i - 1) % cfg.slots, position_offset=offset
        )
        if rule is None or i == cfg.r:
            continue
        # NOTE: the coda attends to earlier positions through the cache; a second decode at the
        # same offset overwrites this position's coda entries (the cache is position-indexed).
        logp = None
        if rule.criterion != "state":
            logits_BSV = model.coda(s_SBH, kv_cache=cache, position_offset=offset)
            logp = F.log_softmax(logits_BSV.float(), -1)
        val = criterion_value(rule, logp, prev_logp, s_SBH, prev_SBH)
        prev_logp = logp
        if bool((val < rule.threshold).all()):
            depth = i
            fill_unwritten_slots(cache, offset, i, min(cfg.slots, cfg.r))
            break
        logits_BSV = None
    if logits_BSV is None:
        logits_BSV = model.coda(s_SBH, kv_cache=cache, position_offset=offset)
    return logits_BSV[:, -1], s_SBH[-1:], depth


def generate(
    model, prompt_ids: Sequence[int] | torch.Tensor, cfg: GenerationConfig, on_token=None
) -> GenerationResult:
    """Generate up to cfg.max_new_tokens after `prompt_ids` (one sequence) with a KV cache.

    `on_token(token_id, depth)` is called after each new token (for streaming output).
    """
    device = model_device(model)
    prompt = [int(t) for t in (prompt_ids.tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
    if not prompt:
        raise ValueError("prompt: at least one token is needed (e.g. the end-of-text id)")
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    result = GenerationResult(prompt_ids=prompt, new_ids=[])
    stop = set(int(t) for t in cfg.stop_ids)
    with _EvalMode(model):
        t0 = time.perf_counter()
        cache = new_kv_cache()
        ids_BS = torch.tensor([prompt], dtype=torch.long, device=device)
        logits_BV, last_SBH, depth = _run_chunk(model, ids_BS, cache, 0, cfg, None, adaptive=False)
        result.prefill_seconds = time.perf_counter() - t0
        offset = len(prompt)
        for _ in range(cfg.max_new_tokens):
            tok = int(sample_next(logits_BV, cfg.temperature, cfg.top_p, gen)[0])
            result.new_ids.append(tok)
            result.depths.append(depth)
            if on_token is not None:
                on_token(tok, depth)
            if tok in stop or len(result.new_ids) == cfg.max_new_tokens:
                break
            ids_BS = torch.tensor([[tok]], dtype=torch.long, device=device)
            warm = last_SBH if cfg.continuous_cot else None
            logits_BV, last_SBH, depth = _run_chunk(
                model, ids_BS, cache, offset, cfg, warm, adaptive=True
            )
            offset += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result.seconds = time.perf_counter() - t0
    return result


def generate_uncached(
    model,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    r: int,
    state_init: str = "zero",
    seed: int = 0,
) -> list[int]:
    """Greedy reference: recompute the whole sequence at fixed r for every new token."""
    device = model_device(model)
    ids = [int(t) for t in prompt_ids]
    out: list[int] = []
    with _EvalMode(model):
        for _ in range(max_new_tokens):
            ids_BS = torch.tensor([ids], dtype=torch.long, device=device)
            e_SBH = model.prelude(ids_BS)
            s_SBH = model.initial_state(e_SBH, state_init, seed, None)
            for i in range(r):
                s_SBH = model.core_step(s_SBH, e_SBH, cache_slot=i)
            tok = int(model.coda(s_SBH)[0, -1].argmax())
            out.append(tok)
            ids.append(tok)
    return out
