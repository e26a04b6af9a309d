"""The model's decomposed forward (prelude, one core iteration, coda) without per-call overhead.

`RecurrentDepthLM.prelude / core_step / coda` are convenient and general: each call builds a
RoPE table, a cache view and goes through megatron's TransformerBlock.forward. In a decode the
core iteration runs r times per token, so `LeanForward` does the same computation with all
that can be prepared ahead prepared once:

- RoPE cos/sin come from a `RopeSlice` made once per position (rope_table.py);
- the KV cache is a `StaticKVCache` whose views are made once per decode (static_cache.py);
- the layers of a block are called directly (TransformerBlock.forward adds nothing at inference:
  no final norm in rdpt's blocks, no fp8, no sequence parallelism, no CUDA graphs of megatron's);
- the adapter input concat(s, e) is one buffer per position whose e half is written once; each
  iteration copies s into the other half.

Every number is bitwise what the general path computes (tests/test_decode.py compares them).

    lean = LeanForward(model)
    e_SBH = lean.prelude(ids_BS, rope, cache.view("prelude"))
    adapter_in = lean.adapter_input(e_SBH)            # [S, B, 2H], e written once
    s_SBH = lean.core(s_SBH, adapter_in, rope, cache.view("core", slot))
    logits_BSV = lean.coda(s_SBH, rope, cache.view("coda"))
"""

from __future__ import annotations

import torch

from pipeline.model import compat


class LeanForward:
    """Prelude / core iteration / coda of a RecurrentDepthLM for decoding (see module doc)."""

    def __init__(self, model):
        self.model = model
        self.prelude_layers = list(model.prelude_block.layers)
        self.core_layers = list(model.core_block.layers)
        self.coda_layers = list(model.coda_block.layers)
        self.hidden = model.cfg.hidden_size

    @staticmethod
    def _layers(layers, x_SBH, rope, view):
        for layer in layers:
            x_SBH, _ = layer(hidden_states=x_SBH, rotary_pos_emb=rope, inference_context=view)
        return x_SBH

    def prelude(self, input_ids_BS, rope, view=None) -> torch.Tensor:
        """e [S, B, H] for new positions (the cache view's offset is theirs)."""
        return self._layers(self.prelude_layers, self.model.embed(input_ids_BS), rope, view)

    def adapter_input(self, e_SBH: torch.Tensor) -> torch.Tensor:
        """The [S, B, 2H] buffer concat(s, e) of these positions, with e already in place."""
        buf = e_SBH.new_empty((*e_SBH.shape[:-1], 2 * self.hidden))
        buf[..., self.hidden :] = e_SBH
        return buf

    def core(self, s_SBH, adapter_in_SB2H, rope, view=None) -> torch.Tensor:
        """One core iteration: core(adapter(concat(s, e))); writes s into adapter_in."""
        adapter_in_SB2H[..., : self.hidden] = s_SBH
        x, _ = self.model.adapter(compat.scatter_last_dim(adapter_in_SB2H))
        return self._layers(self.core_layers, x, rope, view)

    def coda_hidden(self, s_SBH, rope, view=None) -> torch.Tensor:
        """ln_f -> coda -> ln_f: the hidden states the head reads."""
        ln_f = self.model.ln_f
        return ln_f(self._layers(self.coda_layers, ln_f(s_SBH), rope, view))

    def coda(self, s_SBH, rope, view=None) -> torch.Tensor:
        """ln_f -> coda -> ln_f -> head: full-vocabulary logits [B, S, V]."""
        return self.model.head(self.coda_hidden(s_SBH, rope, view))
