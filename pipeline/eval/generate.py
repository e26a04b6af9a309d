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

`generate` (one prompt) and `generate_batch` (B prompts of equal length) run the lean decode
loop of decode.py (static KV cache, RoPE once per position, the fast step of
model/fast_decode.py where it applies).

    res = generate(model, prompt_ids, GenerationConfig(max_new_tokens=64, r=32))
    res.new_ids, res.depths, res.tokens_per_s
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.eval.adaptive import ExitRule
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
    # decode.py: None = on with CUDA (compile; graphs for fixed r with a deterministic state)
    compile: bool | None = None
    cuda_graph: bool | None = None
    static_shapes: bool = False  # static-shape decode steps without compile (what they run)
    # model/fast_decode.py for the decode steps: None = where it applies (fp32, TP 1, no
    # static shapes), True = required (ValueError saying why not), False = the model's layers
    fast_path: bool | None = None
    # the fast step's steps of a few rows in rdpt's C kernels (model/native_kernels.py): None =
    # when they build and apply (see model/fast_decode.py), True = required, False = torch ops
    native_kernels: bool | None = None

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
    graph_replays: int = 0  # decode steps run as a CUDA graph replay
    decode_path: str = ""  # decode.DecodeLoop.path: which code ran the steps

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
            "graph_replays": self.graph_replays,
            "decode_path": self.decode_path,
        }


ARGMAX_BLOCK = 128  # greedy_ids: logits per block of the blocked CPU argmax


def greedy_ids(logits_BV: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim, equal to torch.argmax (first index of the maximum; a NaN counts
    as the maximum). On CPU torch.argmax is a scalar loop (measured ~200 us for 8 x 8192 fp32
    on one thread, while amax takes ~15): for several rows, the maximum of each block of 128
    logits first, the first block holding the row's maximum, then argmax inside that block
    (~50 us). One row keeps torch.argmax (~27 us, no faster this way)."""
    B, V = logits_BV.shape
    cpu = logits_BV.device.type == "cpu"
    if not cpu or B == 1 or V % ARGMAX_BLOCK or V < 8 * ARGMAX_BLOCK:
        return logits_BV.argmax(-1)
    blocks_BKb = logits_BV.view(B, V // ARGMAX_BLOCK, ARGMAX_BLOCK)
    block_B = blocks_BKb.amax(-1).argmax(-1)
    rows = torch.arange(B, device=logits_BV.device)
    return block_B * ARGMAX_BLOCK + blocks_BKb[rows, block_B].argmax(-1)


def sample_next(
    logits_BV: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B]: argmax at temperature 0, else temperature + nucleus sampling."""
    if temperature <= 0:
        return greedy_ids(logits_BV)
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


@dataclass
class BatchGenerationResult:
    """Generated ids of B equal-length prompts decoded together; `depths[t]` is the number of
    iterations step t spent (one per step: adaptive exit waits for every sequence)."""

    new_ids: list[list[int]]
    depths: list[int] = field(default_factory=list)
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    telemetry: list[list[float]] | None = None
    graph_replays: int = 0  # decode steps run as a CUDA graph replay
    decode_path: str = ""  # decode.DecodeLoop.path: which code ran the steps

    @property
    def tokens_per_s(self) -> float:
        """New tokens (all sequences) per second of the whole call (prefill included)."""
        n = sum(len(ids) for ids in self.new_ids)
        return n / self.seconds if self.seconds > 0 else 0.0


def generate_batch(
    model, prompts_BP: torch.Tensor, cfg: GenerationConfig, on_token=None, telemetry=False
) -> BatchGenerationResult:
    """Decode B prompts of equal length [B, P] together with the lean decode loop (decode.py).

    A sequence that emits one of cfg.stop_ids stops there (its list ends with that id); the
    call ends when every sequence stopped or has cfg.max_new_tokens. `on_token(ids, depth)`
    gets the B new ids of every step. `telemetry`: record the per-iteration relative state
    change of every decoded position (result.telemetry[t][i - 1])."""
    from pipeline.eval.decode import DecodeLoop

    device = model_device(model)
    prompts_BP = torch.as_tensor(prompts_BP, dtype=torch.long).to(device)
    if prompts_BP.dim() != 2 or prompts_BP.shape[1] < 1:
        raise ValueError("prompt: at least one token is needed (e.g. the end-of-text id)")
    B, P = prompts_BP.shape
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    result = BatchGenerationResult(new_ids=[[] for _ in range(B)])
    stop = set(int(t) for t in cfg.stop_ids)
    done = [False] * B
    with _EvalMode(model):
        t0 = time.perf_counter()
        cuda = device.type == "cuda"
        graph = cfg.cuda_graph
        if graph is None:
            from pipeline.eval.decode import FixedDepthGraph

            graph = cuda and not telemetry and FixedDepthGraph.applies(cfg)
        loop = DecodeLoop(
            model,
            cfg,
            batch=B,
            capacity=P + cfg.max_new_tokens,
            device=device,
            telemetry=telemetry,
            static_shapes=cfg.static_shapes,
            compile=cuda if cfg.compile is None else cfg.compile,
            cuda_graph=graph,
        )
        logits_BV, last_SBH, depth = loop.step(prompts_BP, 0, None, adaptive=False)
        result.prefill_seconds = time.perf_counter() - t0
        offset = P
        for t in range(cfg.max_new_tokens):
            tok_B = sample_next(logits_BV, cfg.temperature, cfg.top_p, gen)
            toks = tok_B.tolist()
            result.depths.append(depth)
            for b, tok in enumerate(toks):
                if not done[b]:
                    result.new_ids[b].append(tok)
                    done[b] = tok in stop
            if on_token is not None:
                on_token(toks, depth)
            if all(done) or t + 1 == cfg.max_new_tokens:
                break
            warm = last_SBH if cfg.continuous_cot else None
            logits_BV, last_SBH, depth = loop.step(tok_B[:, None], offset, warm, adaptive=True)
            offset += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result.seconds = time.perf_counter() - t0
        result.telemetry = loop.telemetry
        result.graph_replays = loop.graph_replays
        result.decode_path = loop.path
    return result


def generate(
    model, prompt_ids: Sequence[int] | torch.Tensor, cfg: GenerationConfig, on_token=None
) -> GenerationResult:
    """Generate up to cfg.max_new_tokens after `prompt_ids` (one sequence) with a KV cache.

    `on_token(token_id, depth)` is called after each new token (for streaming output).
    """
    prompt = [int(t) for t in (prompt_ids.tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
    if not prompt:
        raise ValueError("prompt: at least one token is needed (e.g. the end-of-text id)")
    each = None if on_token is None else (lambda toks, depth: on_token(toks[0], depth))
    out = generate_batch(model, torch.tensor([prompt]), cfg, on_token=each)
    return GenerationResult(
        prompt_ids=prompt,
        new_ids=out.new_ids[0],
        depths=out.depths,
        seconds=out.seconds,
        prefill_seconds=out.prefill_seconds,
        graph_replays=out.graph_replays,
        decode_path=out.decode_path,
    )


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
