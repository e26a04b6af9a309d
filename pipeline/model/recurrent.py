"""RecurrentDepthLM: prelude -> core looped r times on a latent state -> coda -> tied LM head.

Layout inside the model is megatron's [S, B, H]; the public forward takes/returns [B, S, ...].

    e = prelude(embed(x) * sqrt(h))
    s_0 = initial_state(e)                       # truncated normal (or zeros), per sample id
    s_i = core(adapter(concat(s_{i-1}, e)))      # i = 1..r; the first r-k under no_grad; fp32
    logits = head(ln_f(coda(ln_f(s_r))))         # head tied to the embedding

prelude_block, core_block and coda_block are megatron-core `TransformerBlock`s (n_prelude /
n_core / n_coda layers, the layer of layers.py; no final norm of their own: the model's ln_f is
shared, Huginn-style); their layers are `<part>_block.layers.<i>`. rdpt's KV cache reaches the
layers through TransformerBlock's `inference_context` argument (kv_cache.CacheView).

The published model (Geiping et al. 2025, huginn-0125) in detail, as rdpt computes it:
- embedding `wte[ids] * sqrt(h)`, no positional embedding; RMSNorm `x * rsqrt(mean(x^2) +
  1e-6) * w` in fp32, no bias and no (1 + w) offset; no bias in any linear layer;
- attention: one fused QKV projection, a learned `qk_bias` [2, heads, head_dim] added to q and
  k *before* RoPE; RoPE base 50000 over interleaved pairs (2i, 2i+1) in fp32; causal, scale
  1/sqrt(head_dim), no GQA (attention.py); MLP: SwiGLU with the gate as the first half of fc;
- s_0: truncated normal, std sqrt(2 / (5h)) cut at +-3 std, times sqrt(h), drawn per sample
  from (state seed, global sample id); zeros when a deterministic evaluation is wanted;
- each iteration runs the adapter on concat([s, e]) (state first) then the core layers;
- after the last iteration: ln_f, the coda, the same ln_f again, the head tied to `wte`, no
  logit scaling. huginn-0125: h 5280, 55 heads x 96, MLP 17920, vocab 65536, 2/4/2 layers,
  3,564,976,800 parameters (tests/test_model.py checks the count).

Nothing here imports deepspeed or touches parallel_state beyond megatron's TP layers: parameters
are created in module constructors (ZeRO-3 zero.Init friendly).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from pipeline.common.errors import RdptConfigError
from pipeline.model import compat
from pipeline.model.config import STATE_INITS, ModelConfig
from pipeline.model.depth import split_steps
from pipeline.model.kv_cache import CacheView
from pipeline.model.layers import ColumnLinear, RMSNorm, RowLinear, block_spec
from pipeline.model.loss import chunked_cross_entropy, unfused_cross_entropy

STATE_DTYPE = torch.float32
"""The latent state between core iterations is fp32 in every model dtype (as in the reference
training code under bf16 autocast): r up to ~100 iterations would otherwise round the state
to bf16 r times. Only the matmuls' inputs are cast to the model's dtype."""


class RecurrentOutput(NamedTuple):
    """Result of `RecurrentDepthLM.forward`.

    loss_BS: per-token cross entropy (fp32) when labels were given, else None.
    logits_BSV: full-vocabulary logits when no labels were given, else None.
    telemetry: {"rel_change": fp32 [r] (||s_i - s_{i-1}|| / ||s_i||), "state_cosine": fp32
        scalar (mean pairwise cosine of the final token states)} when asked for, else None.
    """

    loss_BS: torch.Tensor | None
    logits_BSV: torch.Tensor | None
    telemetry: dict | None


def state_seed_for(seed: int, sample_id: int) -> int:
    """Seed of one sample's initial state: depends only on (state_seed, global sample id).
    splitmix64 of both, so every bit of the result depends on both inputs (the CPU generator
    only uses the low 32 bits of a seed)."""
    mask = (1 << 64) - 1
    x = (((int(seed) & 0xFFFFFFFF) << 32) | (int(sample_id) & 0xFFFFFFFF)) & mask
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def mean_pairwise_cosine(s_SBH: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the mean cosine between distinct token states (collapse -> 1)."""
    S = s_SBH.shape[0]
    if S < 2:
        return torch.ones((), device=s_SBH.device)
    u = F.normalize(s_SBH.float(), dim=-1)
    total = u.sum(dim=0).pow(2).sum(dim=-1)  # [B] = S + sum_{i != j} cos_ij
    return ((total - S) / (S * (S - 1))).mean()


class RecurrentDepthLM(MegatronModule):
    """Huginn-style recurrent-depth decoder built from megatron-core modules (see module doc)."""

    def __init__(self, cfg: ModelConfig, config):
        super().__init__(config=config)
        self.cfg = cfg
        h = cfg.hidden_size
        from pipeline.model.init import normal_init

        output_init = normal_init(cfg.output_init_std)  # std / sqrt(2 L), L per model.init

        def make_block(n):
            # A block's config says how many layers it has (megatron numbers layers, sizes
            # pipeline splits and fp8 windows from it). pre_process: the block's input is the
            # hidden_states argument (not a pipeline stage's input tensor); post_layer_norm off:
            # the final norm is the model's shared ln_f.
            return TransformerBlock(
                dataclasses.replace(config, num_layers=n),
                block_spec(
                    cfg.layer_type,
                    n,
                    eps=cfg.norm_eps,
                    qk_bias=cfg.qk_bias,
                    backend=cfg.attention_backend,
                    output_init_method=output_init,
                ),
                post_layer_norm=False,
                pre_process=True,
                post_process=True,
            )

        self.embedding = tensor_parallel.VocabParallelEmbedding(
            cfg.vocab_size, h, init_method=config.init_method, config=config
        )
        self.prelude_block = make_block(cfg.n_prelude)
        self.adapter = RowLinear(
            2 * h,
            h,
            config=config,
            init_method=config.init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        self.core_block = make_block(cfg.n_core)
        self.coda_block = make_block(cfg.n_coda)
        self.ln_f = RMSNorm(h, eps=cfg.norm_eps, params_dtype=config.params_dtype)
        if cfg.tie_embeddings:
            self.output_layer = None
        else:
            self.output_layer = ColumnLinear(
                h,
                cfg.vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                gather_output=False,
            )
        self.exit_gate = None
        if cfg.exit_gate:  # frozen at creation: only train.stage=exit_gate trains it
            from pipeline.model.exit_gate import ExitGate

            self.exit_gate = ExitGate(h, cfg.norm_eps, config.params_dtype, cfg.resolved_init_std)
        self.rotary = compat.make_rotary(cfg.head_dim, cfg.rope_base)
        # One core iteration as the forward runs it: (s, e, rope) -> s'. wrap_iteration() may
        # replace it (activation checkpointing, compile); it holds no parameters of its own.
        self.iteration: Callable = self._core

    # ------------------------------------------------------------------ pieces
    def _rope(self, seq_len: int, offset: int, device) -> torch.Tensor:
        return compat.rope_emb(self.rotary, seq_len, offset, device)

    def _run(self, block, name, slot, x_SBH, rope, kv_cache, position_offset):
        # The layers take the KV cache through TransformerBlock's inference_context pass-through
        # (see kv_cache.CacheView); the attention is causal by construction (no mask).
        view = None if kv_cache is None else CacheView(kv_cache, name, slot, position_offset)
        return block(
            hidden_states=x_SBH, attention_mask=None, rotary_pos_emb=rope, inference_context=view
        )

    def embed(self, input_ids_BS) -> torch.Tensor:
        """Token embeddings (times sqrt(h) when configured) in layout [S, B, H]."""
        x_SBH = self.embedding(input_ids_BS).transpose(0, 1).contiguous()
        if self.cfg.scale_embedding:
            x_SBH = x_SBH * math.sqrt(self.cfg.hidden_size)
        return x_SBH

    def prelude(self, input_ids_BS, kv_cache=None, position_offset: int = 0) -> torch.Tensor:
        """Embed (times sqrt(h)) and run the prelude: returns e [S, B, H]."""
        return self.prelude_embedded(self.embed(input_ids_BS), kv_cache, position_offset)

    def prelude_embedded(self, x_SBH, kv_cache=None, position_offset: int = 0) -> torch.Tensor:
        """The prelude on given input vectors [S, B, H] (embedded tokens, or continuous
        thoughts: model/continuous_thought.py): returns e [S, B, H]."""
        rope = self._rope(x_SBH.shape[0], position_offset, x_SBH.device)
        return self._run(self.prelude_block, "prelude", 0, x_SBH, rope, kv_cache, position_offset)

    def initial_state(
        self, e_SBH, mode: str | None = None, seed: int = 0, sample_ids_B=None
    ) -> torch.Tensor:
        """s_0 [S, B, H] in fp32: zeros, or a truncated normal (std sqrt(2/(5h)) cut at +-3
        std, times sqrt(h) by default) drawn per sample from a generator seeded by (seed,
        sample id), so a sample's state never depends on the batch it sits in or the
        data-parallel size."""
        mode = mode or self.cfg.state_init
        if mode not in STATE_INITS:
            raise RdptConfigError(f"state_init: expected one of {STATE_INITS}, got {mode!r}")
        S, B, H = e_SBH.shape
        if mode == "zero":
            return torch.zeros_like(e_SBH, dtype=STATE_DTYPE)
        if sample_ids_B is None:
            ids = list(range(B))
        else:
            ids = [int(i) for i in torch.as_tensor(sample_ids_B).reshape(-1).tolist()]
            if len(ids) != B:
                raise ValueError(f"sample_ids_B has {len(ids)} ids for a batch of {B}")
        std, scale = self.cfg.resolved_state_std, self.cfg.resolved_state_scale
        dev = e_SBH.device
        out = torch.empty((S, B, H), dtype=torch.float32, device=dev)
        with torch.no_grad():
            for b, sid in enumerate(ids):
                g = torch.Generator(device=dev).manual_seed(state_seed_for(seed, sid))
                torch.nn.init.trunc_normal_(
                    out[:, b], mean=0.0, std=std, a=-3 * std, b=3 * std, generator=g
                )
        return out * scale  # fp32 whatever the model's dtype (see STATE_DTYPE)

    def _core(self, s_SBH, e_SBH, rope, kv_cache=None, cache_slot=0, position_offset=0):
        # NOTE: state first, then the embedded input (Huginn's adapter layout). The adapter's
        # matmul runs in the model's dtype; its output joins the state's dtype (fp32), so the
        # core's residual stream and norms, and the state it returns, stay fp32.
        x_in = torch.cat([s_SBH.to(e_SBH.dtype), e_SBH], dim=-1)
        x, _ = self.adapter(compat.scatter_last_dim(x_in))
        x = x.to(s_SBH.dtype)
        return self._run(self.core_block, "core", cache_slot, x, rope, kv_cache, position_offset)

    def wrap_iteration(self, wrapper: Callable[[Callable], Callable]) -> None:
        """Replace the function the forward runs for each core iteration by wrapper(it).

        This is how the training area applies activation checkpointing and torch.compile to
        one iteration (the part that runs r times) without a flag in the forward:
        `model.wrap_iteration(checkpointed)`. The decomposed API (core_step) stays plain."""
        self.iteration = wrapper(self.iteration)

    def core_step(
        self, s_SBH, e_SBH, kv_cache=None, cache_slot: int = 0, position_offset: int = 0
    ) -> torch.Tensor:
        """One core iteration: s <- core(adapter(concat(s, e)))."""
        rope = self._rope(s_SBH.shape[0], position_offset, s_SBH.device)
        return self._core(s_SBH, e_SBH, rope, kv_cache, cache_slot, position_offset)

    def _logits_parallel(self, x_SBH) -> torch.Tensor:
        if self.output_layer is not None:
            return self.output_layer(x_SBH)[0]
        x = tensor_parallel.copy_to_tensor_model_parallel_region(x_SBH)
        return F.linear(x.to(self.embedding.weight.dtype), self.embedding.weight)

    def _coda_hidden(self, s_SBH, kv_cache=None, position_offset=0):
        rope = self._rope(s_SBH.shape[0], position_offset, s_SBH.device)
        x = self.ln_f(s_SBH)
        x = self._run(self.coda_block, "coda", 0, x, rope, kv_cache, position_offset)
        return self.ln_f(x)  # NOTE: the same ln_f again, after the coda (Huginn).

    def coda_hidden(self, s_SBH, kv_cache=None, position_offset: int = 0) -> torch.Tensor:
        """ln_f -> coda -> ln_f: the hidden state the head reads [S, B, H]."""
        return self._coda_hidden(s_SBH, kv_cache, position_offset)

    def exit_logits(self, s_SBH) -> torch.Tensor:
        """The exit gate's logits [B, S] (fp32) for core states [S, B, H] (model/exit_gate.py);
        RdptConfigError when the model has no gate."""
        if self.exit_gate is None:  # eval/adaptive.py::check_rule says how to get one
            raise RdptConfigError("exit_logits: this model has no exit gate (model.exit_gate)")
        return self.exit_gate(s_SBH)

    def head(self, x_SBH) -> torch.Tensor:
        """Full-vocabulary logits [B, S, V] of coda hidden states [S, B, H]."""
        return compat.gather_last_dim(self._logits_parallel(x_SBH)).transpose(0, 1)

    def coda(self, s_SBH, kv_cache=None, position_offset: int = 0) -> torch.Tensor:
        """ln_f -> coda -> ln_f -> head: full-vocabulary logits [B, S, V]."""
        return self.head(self._coda_hidden(s_SBH, kv_cache, position_offset))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids_BS,
        labels_BS=None,
        *,
        r: int,
        backprop_depth: int | None = None,
        state_init: str | None = None,
        state_seed: int = 0,
        sample_ids_B=None,
        telemetry: bool = False,
    ) -> RecurrentOutput:
        """Run the model with r core iterations, of which the last
        min(backprop_depth, r) carry gradients (None: all of them).

        With labels_BS: per-token cross entropy [B, S] (fp32, vocab-parallel, labels < 0 give
        0); without: logits [B, S, V]."""
        n_no_grad, n_grad = split_steps(r, backprop_depth)
        e = self.prelude(input_ids_BS)
        S = e.shape[0]
        rope = self._rope(S, 0, e.device)
        s = self.initial_state(e, state_init, state_seed, sample_ids_B)
        changes = []

        def track(old, new):
            if telemetry:
                with torch.no_grad():
                    d = (new.float() - old.float()).norm() / new.float().norm().clamp_min(1e-30)
                    changes.append(d)

        with torch.no_grad():
            for _ in range(n_no_grad):
                new = self.iteration(s, e, rope)
                track(s, new)
                s = new
        for _ in range(n_grad):
            new = self.iteration(s, e, rope)
            track(s, new)
            s = new

        tele = None
        if telemetry:
            with torch.no_grad():
                tele = {
                    "rel_change": torch.stack(changes),
                    "state_cosine": mean_pairwise_cosine(s),
                }
        x = self._coda_hidden(s)
        if labels_BS is None:
            logits = compat.gather_last_dim(self._logits_parallel(x))
            return RecurrentOutput(None, logits.transpose(0, 1), tele)
        labels_SB = labels_BS.transpose(0, 1)
        valid = labels_SB >= 0
        targets_SB = labels_SB.clamp_min(0).contiguous()
        if self.cfg.loss_chunk_tokens:  # the full fp32 logits never exist at once
            loss_SB = chunked_cross_entropy(
                self._logits_parallel, x, targets_SB, self.cfg.loss_chunk_tokens
            )
        else:
            loss_SB = unfused_cross_entropy(self._logits_parallel, x, targets_SB)
        loss_SB = torch.where(valid, loss_SB, torch.zeros_like(loss_SB))
        return RecurrentOutput(loss_SB.transpose(0, 1), None, tele)
