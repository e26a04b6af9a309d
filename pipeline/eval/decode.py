"""The decode loop every generating path of rdpt runs (`rdpt generate`, the lm-eval adapter's
generate_until, `pipeline.eval.generate.generate`): prefill a prompt, then one position at a
time, r core iterations per position, with adaptive exit, KV-cache sharing and continuous
chain of thought (see generate.py for what those mean).

What makes it lean (a recurrent-depth model spends its test-time compute in this loop):
- one `StaticKVCache` for the whole decode (allocated once: prompt + new tokens positions,
  min(kv_budget, r) core slots), one view per block/slot made once;
- RoPE cos/sin once per position (`RopeTable`), not per layer and iteration;
- `LeanForward`: the layers are called directly, the adapter input is a buffer per position
  whose e half is written once;
- no telemetry unless asked (`telemetry=True` records the per-iteration relative state change
  of every decoded position).
The tokens are exactly those of the general path (model.prelude / core_step / coda with a
growing KVCache): tests/test_decode.py decodes with both.

    loop = DecodeLoop(model, cfg, batch=1, capacity=len(prompt) + cfg.max_new_tokens)
    logits_BV, last_SBH, depth = loop.step(ids_BS, offset=0, warm_SBH=None, adaptive=False)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.eval.adaptive import criterion_value
from pipeline.eval.depth import rel_change
from pipeline.model.lean_forward import LeanForward
from pipeline.model.rope_table import RopeTable
from pipeline.model.static_cache import StaticKVCache


class DecodeLoop:
    """Prefill and decode steps of one generation call over a batch of B sequences.

    `cfg` is a generate.GenerationConfig (r, exit_rule, kv_budget, state_init, seed).
    Adaptive exit (when `adaptive`) stops a step once the criterion is below the threshold
    for every sequence of the batch (B = 1 in `rdpt generate`)."""

    def __init__(self, model, cfg, *, batch: int, capacity: int, device, telemetry=False):
        self.model, self.cfg, self.device = model, cfg, device
        self.lean = LeanForward(model)
        self.slots = min(cfg.slots, cfg.r)  # slots >= r are never written
        self.cache = StaticKVCache.for_model(
            model, batch=batch, capacity=capacity, core_slots=self.slots, device=device
        )
        self.rope = RopeTable.for_model(model, capacity, device)
        self.prelude_view = self.cache.view("prelude")
        self.coda_view = self.cache.view("coda")
        self.core_views = [self.cache.view("core", i % self.slots) for i in range(cfg.r)]
        self.telemetry: list[list[float]] | None = [] if telemetry else None

    def _set_offset(self, offset: int) -> None:
        self.prelude_view.offset = self.coda_view.offset = offset
        for view in self.core_views[: self.slots]:
            view.offset = offset

    def step(self, ids_BS: torch.Tensor, offset: int, warm_SBH, adaptive: bool):
        """Prelude + core iterations + coda for positions [offset, offset + S).

        Returns (logits of the last position [B, V], final state of the last position
        [1, B, H], iterations spent)."""
        cfg, lean = self.cfg, self.lean
        self._set_offset(offset)
        rope = self.rope.slice(offset, ids_BS.shape[1])
        e_SBH = lean.prelude(ids_BS, rope, self.prelude_view)
        if warm_SBH is not None:
            s_SBH = warm_SBH.expand_as(e_SBH).contiguous() if e_SBH.shape[0] == 1 else warm_SBH
        else:
            s_SBH = self.model.initial_state(e_SBH, cfg.state_init, cfg.seed + offset, None)
        adapter_in = lean.adapter_input(e_SBH)
        rule = cfg.exit_rule if adaptive else None
        needs_logits = rule is not None and rule.criterion != "state"
        prev_logp = None
        if needs_logits:
            prev_logp = F.log_softmax(lean.coda(s_SBH, rope, self.coda_view).float(), -1)
        changes = [] if self.telemetry is not None else None
        depth, logits_BSV = cfg.r, None
        for i in range(1, cfg.r + 1):
            prev_SBH = s_SBH
            s_SBH = lean.core(s_SBH, adapter_in, rope, self.core_views[i - 1])
            if changes is not None:
                changes.append(float(rel_change(s_SBH, prev_SBH).mean()))
            if rule is None or i == cfg.r:
                continue
            logp = None
            if needs_logits:
                # NOTE: the coda writes this position's coda cache entries again at every
                # iteration; the last write (the exit iteration's) is the one kept.
                logits_BSV = lean.coda(s_SBH, rope, self.coda_view)
                logp = F.log_softmax(logits_BSV.float(), -1)
            val = criterion_value(rule, logp, prev_logp, s_SBH, prev_SBH)
            prev_logp = logp
            if bool((val < rule.threshold).all()):
                depth = i
                # later positions must find this one in every slot: copy its last entry
                # into the slots it skipped (the reference's "latest entry" fallback)
                if i < self.slots:
                    self.cache.copy_position(offset, i - 1, range(i, self.slots))
                break
            logits_BSV = None
        if logits_BSV is None:
            logits_BSV = lean.coda(s_SBH, rope, self.coda_view)
        if changes is not None:
            self.telemetry.append(changes)
        return logits_BSV[:, -1], s_SBH[-1:], depth
