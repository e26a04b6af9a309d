"""The two decodes `bench/generate.py` measures rdpt's decode loop against, kept runnable:

1. `generate_before`: rdpt's decode as it was before the lean decode loop (pipeline/eval/
   decode.py), verbatim: the model's general decomposed API (prelude / core_step / coda, each
   through megatron's TransformerBlock) with the growing, dictionary-keyed `KVCache`.
   `score_tokens_before` is teacher-forced scoring (`rdpt eval --adaptive`, lm-eval
   loglikelihood) as it was. tests/test_decode.py checks that today's decode gives exactly
   their tokens and scores.
2. `ReferenceStyleLM`: a plain-PyTorch decode of the same weights written the way the published
   Huginn modeling code is written: one nn.Module per layer (sandwich block, attention, gated
   MLP, RMSNorm), Hugging Face layout tensors, RoPE as a complex multiplication with a
   `freqs_cis` table, torch SDPA, a cache that grows by torch.cat at every write, no compile.
   It stands in for the published code, which rdpt does not contain.

    before = generate_before(model, prompt_ids, GenerationConfig(max_new_tokens=64, r=16))
    ref = ReferenceStyleLM.from_rdpt(model)
    ids_BT = ref.greedy(prompts_BP, max_new_tokens=64, r=16)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.eval.adaptive import ExitRule, TokenScores, criterion_value
from pipeline.eval.depth import IGNORE_INDEX, _EvalMode, model_device
from pipeline.eval.generate import GenerationConfig, GenerationResult, sample_next


# ----------------------------------------------------------------- 1. rdpt before the change
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


def generate_before(
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


def greedy_before(model, prompts_BP: torch.Tensor, max_new_tokens: int, r: int) -> list[list[int]]:
    """`generate_before`'s fixed-r greedy loop over a batch of equal-length prompts (it took
    one prompt; its chunk function `_run_chunk` always handled any batch)."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, r=r)
    device = model_device(model)
    out: list[list[int]] = [[] for _ in range(prompts_BP.shape[0])]
    with _EvalMode(model):
        cache = new_kv_cache()
        ids_BS = prompts_BP.to(device)
        logits_BV, _, _ = _run_chunk(model, ids_BS, cache, 0, cfg, None, adaptive=False)
        offset = ids_BS.shape[1]
        for t in range(max_new_tokens):
            tok_B = logits_BV.argmax(-1)
            for b, tok in enumerate(tok_B.tolist()):
                out[b].append(tok)
            if t + 1 == max_new_tokens:
                break
            logits_BV, _, _ = _run_chunk(model, tok_B[:, None], cache, offset, cfg, None, False)
            offset += 1
    return out


def score_tokens_before(
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
    targets_safe_BS = targets_BS.clamp_min(0)
    e_SBH = model.prelude(inputs_BS)
    s_SBH = model.initial_state(e_SBH, state_init, seed, sample_ids_B)
    B, S = inputs_BS.shape
    if rule is None:
        for i in range(max_r):
            s_SBH = model.core_step(s_SBH, e_SBH, cache_slot=i)
        logp_BSV = F.log_softmax(model.coda(s_SBH).float(), dim=-1)
        logprob = logp_BSV.gather(-1, targets_safe_BS[..., None])[..., 0]
        greedy = logp_BSV.argmax(-1) == targets_BS
        depth = torch.full((B, S), max_r, dtype=torch.long, device=inputs_BS.device)
    else:
        need_logits = rule.criterion != "state"
        prev_logp = F.log_softmax(model.coda(s_SBH).float(), dim=-1) if need_logits else None
        active_BS = torch.ones(B, S, dtype=torch.bool, device=inputs_BS.device)
        logprob = torch.zeros(B, S, dtype=torch.float32, device=inputs_BS.device)
        greedy = torch.zeros(B, S, dtype=torch.bool, device=inputs_BS.device)
        depth = torch.full((B, S), max_r, dtype=torch.long, device=inputs_BS.device)
        for i in range(1, max_r + 1):
            prev_SBH = s_SBH
            new_SBH = model.core_step(s_SBH, e_SBH, cache_slot=i - 1)
            # NOTE: exited positions keep their state; layout is [S, B, H] vs mask [B, S].
            s_SBH = torch.where(active_BS.transpose(0, 1)[..., None], new_SBH, prev_SBH)
            logp = F.log_softmax(model.coda(s_SBH).float(), dim=-1)
            val = criterion_value(rule, logp, prev_logp, s_SBH, prev_SBH)
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


# ----------------------------------------------------------------- 2. the reference's style
class RMSNorm(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(
            x.dtype
        )


def apply_rotary_emb_complex(x_BSNh, freqs_cis_S1P):
    """Rotate interleaved pairs: complex multiplication in fp32 (the reference's formulation)."""
    B, S, N, hd = x_BSNh.shape
    xc = torch.view_as_complex(x_BSNh.float().reshape(B, S, N, hd // 2, 2))
    return torch.view_as_real(xc * freqs_cis_S1P).reshape(B, S, N, hd).to(x_BSNh.dtype)


class CausalSelfAttention(torch.nn.Module):
    def __init__(self, sd, pre, n_heads):
        super().__init__()
        self.Wqkv = torch.nn.Linear(*sd[f"{pre}.attn.Wqkv.weight"].T.shape, bias=False)
        self.Wqkv.weight.data = sd[f"{pre}.attn.Wqkv.weight"].clone()
        self.proj = torch.nn.Linear(*sd[f"{pre}.attn.proj.weight"].T.shape, bias=False)
        self.proj.weight.data = sd[f"{pre}.attn.proj.weight"].clone()
        qk = sd.get(f"{pre}.attn.qk_bias")
        self.qk_bias = None if qk is None else torch.nn.Parameter(qk.clone(), requires_grad=False)
        self.n_heads = n_heads

    def forward(self, x_BSH, freqs_cis, cache: dict, key, causal: bool):
        B, S, H = x_BSH.shape
        hd = H // self.n_heads
        q, k, v = self.Wqkv(x_BSH).view(B, S, 3 * self.n_heads, hd).chunk(3, dim=2)
        if self.qk_bias is not None:
            qb, kb = self.qk_bias.split(1, dim=0)
            q, k = q + qb, k + kb
        q, k = apply_rotary_emb_complex(q, freqs_cis), apply_rotary_emb_complex(k, freqs_cis)
        if key in cache:  # the cache grows by concatenation at every write
            k = torch.cat([cache[key][0], k], dim=1)
            v = torch.cat([cache[key][1], v], dim=1)
        cache[key] = (k, v)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
        )
        return self.proj(y.transpose(1, 2).reshape(B, S, H))


class GatedMLP(torch.nn.Module):
    def __init__(self, sd, pre):
        super().__init__()
        self.fc = torch.nn.Linear(*sd[f"{pre}.mlp.fc.weight"].T.shape, bias=False)
        self.fc.weight.data = sd[f"{pre}.mlp.fc.weight"].clone()
        self.proj = torch.nn.Linear(*sd[f"{pre}.mlp.proj.weight"].T.shape, bias=False)
        self.proj.weight.data = sd[f"{pre}.mlp.proj.weight"].clone()

    def forward(self, x):
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class SandwichBlock(torch.nn.Module):
    def __init__(self, sd, pre, n_heads, eps):
        super().__init__()
        self.norm_1, self.norm_2, self.norm_3, self.norm_4 = (
            RMSNorm(sd[f"{pre}.norm_{j}.weight"], eps) for j in range(1, 5)
        )
        self.attn = CausalSelfAttention(sd, pre, n_heads)
        self.mlp = GatedMLP(sd, pre)

    def forward(self, x, freqs_cis, cache, key, causal):
        x = self.norm_2(x + self.attn(self.norm_1(x), freqs_cis, cache, key, causal))
        return self.norm_4(x + self.mlp(self.norm_3(x)))


class ReferenceStyleLM(torch.nn.Module):
    """Huginn decode in the published code's style over HF-layout weights (module doc)."""

    def __init__(self, sd: dict[str, torch.Tensor], cfg):
        super().__init__()
        n_heads, eps = cfg.num_heads, cfg.norm_eps

        def blocks(name, n):
            return torch.nn.ModuleList(
                SandwichBlock(sd, f"transformer.{name}.{i}", n_heads, eps) for i in range(n)
            )

        self.wte = torch.nn.Embedding.from_pretrained(sd["transformer.wte.weight"].clone())
        self.prelude = blocks("prelude", cfg.n_prelude)
        self.adapter = torch.nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.adapter.weight.data = sd["transformer.adapter.weight"].clone()
        self.core_block = blocks("core_block", cfg.n_core)
        self.coda = blocks("coda", cfg.n_coda)
        self.ln_f = RMSNorm(sd["transformer.ln_f.weight"], eps)
        self.lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight.data = sd["lm_head.weight"].clone()
        cis = sd["freqs_cis"]  # [1, T, 1, hd/2, 2] (cos, sin)
        self.register_buffer("freqs_cis", torch.complex(cis[..., 0], cis[..., 1])[0])
        self.scale = math.sqrt(cfg.hidden_size)

    @classmethod
    def from_rdpt(cls, model) -> ReferenceStyleLM:
        """The same weights as an rdpt model (TP 1), through the Hugging Face export."""
        from pipeline.model.consolidated import full_state_dict
        from pipeline.model.hf_convert import rdpt_to_hf

        sd = rdpt_to_hf(full_state_dict(model), model.cfg)
        return cls({k: v.float() for k, v in sd.items()}, model.cfg).eval()

    @torch.no_grad()
    def forward_positions(self, ids_BS, offset: int, r: int, cache: dict) -> torch.Tensor:
        """Logits of the last new position [B, V]; zero initial state, fixed r."""
        S = ids_BS.shape[1]
        freqs = self.freqs_cis[offset : offset + S]  # [S, 1, hd/2]
        causal = S > 1
        x = self.wte(ids_BS) * self.scale
        for i, block in enumerate(self.prelude):
            x = block(x, freqs, cache, ("prelude", i), causal)
        e = x
        s = torch.zeros_like(e)
        for step in range(r):
            s = self.adapter(torch.cat([s, e], dim=-1))
            for i, block in enumerate(self.core_block):
                s = block(s, freqs, cache, ("core", step, i), causal)
        x = self.ln_f(s)
        for i, block in enumerate(self.coda):
            x = block(x, freqs, cache, ("coda", i), causal)
        return self.lm_head(self.ln_f(x))[:, -1]

    @torch.no_grad()
    def greedy(self, prompts_BP: torch.Tensor, max_new_tokens: int, r: int) -> list[list[int]]:
        cache: dict = {}
        logits_BV = self.forward_positions(prompts_BP, 0, r, cache)
        offset = prompts_BP.shape[1]
        out: list[list[int]] = [[] for _ in range(prompts_BP.shape[0])]
        for t in range(max_new_tokens):
            tok_B = logits_BV.argmax(-1)
            for b, tok in enumerate(tok_B.tolist()):
                out[b].append(tok)
            if t + 1 == max_new_tokens:
                break
            logits_BV = self.forward_positions(tok_B[:, None], offset, r, cache)
            offset += 1
        return out
