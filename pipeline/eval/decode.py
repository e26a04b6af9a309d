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
  of every decoded position);
- the steps of an fp32 model at TP 1 run `FastDecodeStep` (model/fast_decode.py: the same
  layers in ~20 kernels instead of ~40, over weights laid out once per decode); otherwise
  (bf16, tensor parallelism, static-shape steps for compile and CUDA graphs) the layers
  themselves run (LeanForward).
The tokens are those of the general path (model.prelude / core_step / coda with a growing
KVCache): tests/test_decode.py decodes with both. LeanForward's numbers are bitwise the general
path's; FastDecodeStep's differ in the last bits (sums in another order), which the tests
check does not change a token or an exit depth.

On CUDA (GenerationConfig.compile / cuda_graph, both on by default there) decode steps switch
to static shapes (`StaticShapeSteps`: position tensors, a key mask over the whole cache), one
core iteration and the coda are compiled with torch.compile once, and a fixed-r step (no
adaptive exit) is captured as one CUDA graph (`FixedDepthGraph`) and replayed for every token.

    loop = DecodeLoop(model, cfg, batch=1, capacity=len(prompt) + cfg.max_new_tokens)
    logits_BV, last_SBH, depth = loop.step(ids_BS, offset=0, warm_SBH=None, adaptive=False)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.eval.adaptive import check_rule, criterion_value, needs_logits
from pipeline.eval.depth import rel_change
from pipeline.model.fast_decode import FastDecodeStep, unsupported_reason
from pipeline.model.lean_forward import LeanForward
from pipeline.model.rope_table import RopeSlice, RopeTable
from pipeline.model.static_cache import PositionTensorView, StaticKVCache


class DecodeLoop:
    """Prefill and decode steps of one generation call over a batch of B sequences.

    `cfg` is a generate.GenerationConfig (r, exit_rule, kv_budget, state_init, seed).
    Adaptive exit (when `adaptive`) stops a step once the criterion is below the threshold
    for every sequence of the batch (B = 1 in `rdpt generate`)."""

    def __init__(
        self,
        model,
        cfg,
        *,
        batch: int,
        capacity: int,
        device,
        telemetry=False,
        static_shapes: bool = False,
        compile: bool = False,
        cuda_graph: bool = False,
    ):
        self.model, self.cfg, self.device = model, cfg, torch.device(device)
        check_rule(model, cfg.exit_rule)
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
        static = static_shapes or compile or cuda_graph
        self.static = StaticShapeSteps(self, compile) if static else None
        self.graph = None
        if cuda_graph:
            if telemetry or not FixedDepthGraph.applies(cfg):
                raise ValueError(
                    "cuda_graph: a graph replays a fixed-r step; it needs no adaptive exit, no "
                    "telemetry and a deterministic initial state (state_init zero or "
                    "continuous CoT)"
                )
            if self.device.type != "cuda":
                raise ValueError("cuda_graph: CUDA graphs need a CUDA device")
            self.graph = FixedDepthGraph(self, batch)
        self.graph_replays = 0
        self.fast = self._fast_step(cfg.fast_path)

    def _fast_step(self, wanted: bool | None) -> FastDecodeStep | None:
        """FastDecodeStep for the dynamic-shape steps: wanted None = when it applies (not with
        static-shape steps, which compile and graphs need), True = required, False = off."""
        if wanted is False:
            if self.cfg.native_kernels:
                raise ValueError("native_kernels: they run inside the fast step (fast_path off)")
            return None
        reason = (
            "static-shape steps (compile, CUDA graphs)"
            if self.static is not None
            else unsupported_reason(self.model)
        )
        if reason is not None:
            if wanted:
                raise ValueError(f"fast_path: the fast decode step does not run {reason}")
            if self.cfg.native_kernels:
                raise ValueError(f"native_kernels: they run in the fast step, not for {reason}")
            return None
        return FastDecodeStep(self.model, self.cache, self.rope, self.cfg.native_kernels)

    @property
    def path(self) -> str:
        """Which code runs the decode steps: "native-kernels" (the fast step in rdpt's C
        kernels), "fast-step" (the fast step in torch operations), "cuda-graph" / "compiled" /
        "static-shapes" (the static-shape steps), or "layers" (the model's own modules)."""
        if self.fast is not None:
            return "native-kernels" if self.fast.kernels is not None else "fast-step"
        if self.graph is not None:
            return "cuda-graph"
        if self.static is not None:
            return "compiled" if self.static.compile else "static-shapes"
        return "layers"

    def _set_offset(self, offset: int) -> None:
        self.prelude_view.offset = self.coda_view.offset = offset
        for view in self.core_views[: self.slots]:
            view.offset = offset

    def _core(self, s_SBH, adapter_in, i: int):
        return self.lean.core(s_SBH, adapter_in, self._rope_now, self.core_views[i])

    def _fast_core(self, s_SBH, adapter_in, i: int):
        return self.fast.core(s_SBH, adapter_in, i % self.slots)

    def _coda(self, s_SBH):
        return self.lean.coda(s_SBH, self._rope_now, self.coda_view)

    # NOTE: inference mode, not only no_grad: tensors made here carry no version counter or
    # autograd metadata, which measured ~20% off a one-position step of a small model on CPU
    # (each of its ~40 operations pays that bookkeeping). What a step returns is therefore an
    # inference tensor: fine to read, sample from and feed back into step, but not to modify
    # in place outside inference mode.
    @torch.inference_mode()
    def step(
        self,
        ids_BS: torch.Tensor,
        offset: int,
        warm_SBH,
        adaptive: bool,
        *,
        r: int | None = None,
        all_positions: bool = False,
    ):
        """Prelude + core iterations + coda for positions [offset, offset + S).

        Returns (logits of the last position [B, V], final state of the last position
        [1, B, H], iterations spent). `r`: fewer iterations than cfg.r for this step (a
        speculative draft; slots as usual). `all_positions`: logits of every new position
        [B, S, V] instead of the last one's (a speculative verification pass)."""
        cfg, lean = self.cfg, self.lean
        S = ids_BS.shape[1]
        r = cfg.r if r is None else r
        if not 1 <= r <= cfg.r:
            raise ValueError(f"r: a step runs 1..{cfg.r} iterations, got {r}")
        fast = self.fast
        if fast is not None:
            fast.set_position(offset, S)
            core, coda = self._fast_core, fast.coda
            e_SBH = fast.prelude(ids_BS)
        elif S == 1 and self.static is not None:
            self.static.set_position(offset)
            if self.graph is not None and r == cfg.r:
                self.graph_replays += 1
                return (*self.graph.run(ids_BS, warm_SBH), cfg.r)
            rope, core, coda = self.static.rope_1, self.static.core, self.static.coda
            e_SBH = lean.prelude(ids_BS, rope, self.static.prelude_view)
        else:
            self._set_offset(offset)
            rope = self._rope_now = self.rope.slice(offset, S)
            core, coda = self._core, self._coda
            e_SBH = lean.prelude(ids_BS, rope, self.prelude_view)
        if warm_SBH is not None:
            s_SBH = warm_SBH.expand_as(e_SBH).contiguous() if e_SBH.shape[0] == 1 else warm_SBH
        else:
            s_SBH = self.model.initial_state(e_SBH, cfg.state_init, cfg.seed + offset, None)
        adapter_in = (fast or lean).adapter_input(e_SBH)
        rule = cfg.exit_rule if adaptive else None
        with_logits = needs_logits(rule)
        prev_logp = None
        if with_logits:
            prev_logp = F.log_softmax(coda(s_SBH).float(), -1)
        changes = [] if self.telemetry is not None else None
        depth, logits_BSV = r, None
        for i in range(1, r + 1):
            prev_SBH = s_SBH
            s_SBH = core(s_SBH, adapter_in, i - 1)
            if changes is not None:
                changes.append(float(rel_change(s_SBH, prev_SBH).mean()))
            if rule is None or i == r:
                continue
            logp = None
            if with_logits:
                # NOTE: the coda writes this position's coda cache entries again at every
                # iteration; the last write (the exit iteration's) is the one kept.
                logits_BSV = coda(s_SBH)
                logp = F.log_softmax(logits_BSV.float(), -1)
            val = criterion_value(rule, logp, prev_logp, s_SBH, prev_SBH, self.model)
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
            logits_BSV = coda(s_SBH)
        if changes is not None:
            self.telemetry.append(changes)
        return (logits_BSV if all_positions else logits_BSV[:, -1]), s_SBH[-1:], depth


class StaticShapeSteps:
    """Decode steps (one new position) whose tensors keep their shapes from step to step: the
    position is a tensor written in place, the attention reads the whole cache under a key
    mask (static_cache.PositionTensorView), RoPE rows are copied into fixed buffers. That is
    what torch.compile needs to compile one core iteration once (no recompiles as the cache
    fills) and what a CUDA graph needs to replay a step. The tokens equal the dynamic-shape
    path's; the numbers may differ in the last bits (the softmax runs over the whole buffer,
    with exact zeros for masked keys)."""

    def __init__(self, loop: DecodeLoop, compile: bool):
        dev, cache = loop.device, loop.cache
        self.loop, self.compile = loop, compile
        self.pos_1 = torch.zeros(1, dtype=torch.long, device=dev)
        self.key_mask_K = torch.zeros(cache.capacity, dtype=torch.bool, device=dev)
        self.positions_K = torch.arange(cache.capacity, device=dev)
        self.rope_1 = RopeSlice(
            loop.rope.cos_S11h[:1].clone(), loop.rope.sin_signed_S11h[:1].clone()
        )
        pos, mask = self.pos_1, self.key_mask_K
        self.prelude_view = cache.position_tensor_view("prelude", 0, pos, mask)
        self.coda_view = cache.position_tensor_view("coda", 0, pos, mask)
        self.core_kv = [
            (cache.view("core", i % loop.slots).k_LCBNh, cache.view("core", i % loop.slots).v_LCBNh)
            for i in range(loop.cfg.r)
        ]
        self._core_fn, self._coda_fn = self._core_plain, self._coda_plain
        if compile:
            # one graph each: every call sees tensors of the same shapes (see class doc)
            self._core_fn = torch.compile(self._core_plain, dynamic=False)
            self._coda_fn = torch.compile(self._coda_plain, dynamic=False)

    def set_position(self, offset: int) -> None:
        self.pos_1.fill_(offset)
        torch.le(self.positions_K, offset, out=self.key_mask_K)
        self.rope_1.cos_S11h.copy_(self.loop.rope.cos_S11h[offset : offset + 1])
        self.rope_1.sin_signed_S11h.copy_(self.loop.rope.sin_signed_S11h[offset : offset + 1])

    def _core_plain(self, s_SBH, adapter_in, k_LCBNh, v_LCBNh):
        view = PositionTensorView(k_LCBNh, v_LCBNh, self.pos_1, self.key_mask_K)
        return self.loop.lean.core(s_SBH, adapter_in, self.rope_1, view)

    def _coda_plain(self, s_SBH):
        return self.loop.lean.coda(s_SBH, self.rope_1, self.coda_view)

    def core(self, s_SBH, adapter_in, i: int):
        k_LCBNh, v_LCBNh = self.core_kv[i]
        return self._core_fn(s_SBH, adapter_in, k_LCBNh, v_LCBNh)

    def coda(self, s_SBH):
        return self._coda_fn(s_SBH)


class FixedDepthGraph:
    """A CUDA graph of one whole fixed-r decode step (prelude, r core iterations, coda) over
    the static-shape pieces: captured at the first decode step, replayed at every later one
    with the new token id (and warm state) copied into its input buffers."""

    @staticmethod
    def applies(cfg) -> bool:
        return cfg.exit_rule is None and (cfg.state_init == "zero" or cfg.continuous_cot)

    def __init__(self, loop: DecodeLoop, batch: int):
        self.loop = loop
        dev, h = loop.device, loop.model.cfg.hidden_size
        dtype = loop.model.embedding.weight.dtype
        self.ids_B1 = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.warm_1BH = torch.zeros(1, batch, h, dtype=dtype, device=dev)
        self.graph = None
        self.out = None

    def _body(self):
        loop, st = self.loop, self.loop.static
        e_SBH = loop.lean.prelude(self.ids_B1, st.rope_1, st.prelude_view)
        if loop.cfg.continuous_cot:
            s_SBH = self.warm_1BH.expand_as(e_SBH).contiguous()
        else:
            s_SBH = torch.zeros_like(e_SBH)
        adapter_in = loop.lean.adapter_input(e_SBH)
        for i in range(loop.cfg.r):
            s_SBH = st.core(s_SBH, adapter_in, i)
        return st.coda(s_SBH)[:, -1], s_SBH[-1:]

    def run(self, ids_B1, warm_SBH):
        self.ids_B1.copy_(ids_B1)
        if warm_SBH is not None:
            self.warm_1BH.copy_(warm_SBH)
        if self.graph is None:
            # warm-up on a side stream (compiles, allocator pools), then capture; the warm-up
            # writes this position's cache entries with the values the replay writes again
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._body()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._body()
        self.graph.replay()
        return self.out[0].clone(), self.out[1].clone()
