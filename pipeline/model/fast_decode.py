"""Decode steps of a RecurrentDepthLM (one new position, or a few) in few tensor operations.

A decode step of a small model is not compute-bound: on one CPU thread a 128-wide layer does
~0.25 M multiply-adds per token, a few microseconds, while each tensor operation costs several
microseconds of dispatch. A recurrent-depth model repeats its core layers r times per token,
so the time goes where the operations are. `LeanForward` (lean_forward.py) calls the model's
own layers, ~40 kernels per sandwich layer; the published code's style (one module per norm,
RoPE as a complex multiplication, a cache grown by torch.cat) ~55. `FastDecodeStep` runs the
same layer in ~20 kernels (plus ~15 views), over weights laid out once for it:

- **Linear layers as `mm` on transposed copies** ([in, out], contiguous): for a few rows, MKL's
  x @ W^T with W [out, in] (what F.linear runs) measured about twice the time of x @ Wt.
  Residual adds ride in the matmul (`addmm(x, o, Wt_proj)`).
- **RMSNorm as one LayerNorm over [x, -x]**: that vector has mean exactly 0 and variance
  mean(x^2), so LayerNorm's first half is x * rsqrt(mean(x^2) + eps) * w. torch's CPU
  LayerNorm is one fused kernel; `torch.rms_norm` is a composite of ~6 operations (measured
  ~28 us against ~8 us for cat + layer_norm at 128 wide).
- **RoPE on q, k and v at once**: one `addcmul(qkv * cos, pairs_swapped(qkv), sin)` over the
  [B, heads, 3, head_dim] projection, with cos = 1 and sin = 0 in the v rows (v * 1 + x * 0
  is v), so that k and v come out side by side and enter the cache in one copy. For one
  position and small heads it is one `mm` of the [B * heads, 3 head_dim] rows with the
  position's rotation diag(R, R, I) (`ROPE_MM_MACS`): 4.6 vs 16.6 us at batch 1, 10 vs 22 at
  batch 8 (head_dim 32, 4 heads, one thread).
- **The adapter split**: adapter(concat(s, e)) = s A_s + e A_e, and e is fixed for the
  position, so e A_e is computed once per token and each iteration is one addmm.
- The KV cache is the decode's `StaticKVCache` (static_cache.py: per layer
  [B, heads, 2 (k|v), capacity, head_dim]): a position's keys and values are copied into place
  at once and torch SDPA reads the first `offset + 1` positions of each head, contiguous. The
  modules' path (LeanForward) reads and writes the same cache through views, so the two could
  share a decode.

The arithmetic is the model's, in another order (sums split, fused kernels), so values differ
from LeanForward's in the last bits; decoded tokens and exit depths are compared with the
general path in tests/test_decode.py. It applies at tensor-parallel size 1 to fp32 models (the
CPU decode; on CUDA the compiled, graph-captured steps run instead) and holds a transposed copy
of the transformer-layer weights, so models whose layer weights exceed `MAX_PACKED_BYTES` keep
the lean path; the output head is copied (for batch-1 steps without the native kernels) only
up to `MAX_HEAD_COPY_BYTES`.

    fast = FastDecodeStep(model, cache, rope_table)     # once per decode
    fast.set_position(offset, S)                        # once per step (S new positions)
    e_SBH = fast.prelude(ids_BS)
    adapter_in = fast.adapter_input(e_SBH)              # e A_e
    s_SBH = fast.core(s_SBH, adapter_in, slot)          # r times
    logits_BSV = fast.coda(s_SBH)

One position (a generated token) is the hot path (`_attention_1`); several (the prompt, a
speculative verification) attend causally among themselves (`_attention_chunk`).

**Native kernels.** With the operations down to ~20 per layer, a one-position step at batch 8
still spent most of its time in MKL's products for 8 rows and in SDPA (which pays two small
GEMM calls per head), and on the remaining per-operation dispatch. Where rdpt's C kernels
build (native_kernels.py: a C compiler on the machine, RDPT_NATIVE_KERNELS not 0), steps of up
to `NATIVE_MAX_ROWS` rows (positions x batch: decode steps, speculative verifications, short
prompts) run each decoder layer in one call (`rdpt_decoder_layer`: norms, the four products over
weights packed into 32-column panels, RoPE, the cache writes, attention causal among the new
positions, SiLU gate, residuals), the adapter's s A_s and the head as packed products, ln_f in
C. Larger steps (a long prompt) keep the torch operations above, whose MKL products win there
(same cache layout, so the two mix within a decode). The kernels are
single-threaded: by default (`native=None`) they run when torch runs one thread or the layers
are small (`NATIVE_AUTO_LAYER_BYTES`); `native=True` requires them, False turns them off. They
keep a packed copy of the layer weights, the adapter's state half and the head beside the
transposed copies (those serve the several-position steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.model import native_kernels

MAX_PACKED_BYTES = 2 * 1024**3  # transposed copies of the layer weights, at most
MAX_HEAD_COPY_BYTES = 256 * 1024**2  # a transposed copy of the output head, at most
# RoPE of a one-position step as an mm while rows x (3 head_dim)^2 multiply-adds stay below
# this (~10 us on one CPU thread; the three elementwise operations it replaces cost ~15 us
# together): head_dim 32 up to 56 rows (batch 14 at 4 heads), head_dim 96 up to 6 rows.
ROPE_MM_MACS = 2**19
# With torch on several threads, the (single-threaded) native kernels run by default only for
# layers up to this size: on the 2-core VM at two threads they were faster at hidden 128
# (1 MiB per layer) and slower at hidden 512 and 1024 (16 and 64 MiB), where MKL splits the
# memory-bound products across the cores.
NATIVE_AUTO_LAYER_BYTES = 4 * 1024**2
# Steps of up to this many rows (new positions x batch) run in the native kernels, larger ones
# (a long prompt's prefill) in torch operations, whose MKL products win once rows are many.
NATIVE_MAX_ROWS = 32


def unsupported_reason(model) -> str | None:
    """Why FastDecodeStep cannot run `model` (None: it can)."""
    from megatron.core.parallel_state import get_tensor_model_parallel_world_size

    if get_tensor_model_parallel_world_size() != 1:
        return "tensor parallelism (the fast step holds whole weights)"
    layers = [*model.prelude_block.layers, *model.core_block.layers, *model.coda_block.layers]
    layer_params = [p for layer in layers for p in layer.parameters()]
    others = [model.adapter.weight, model.ln_f.weight, model.embedding.weight]
    dtypes = {p.dtype for p in [*layer_params, *others]}
    if dtypes != {torch.float32}:
        return f"weights in {sorted(str(d) for d in dtypes)} (the fast step runs fp32 models)"
    n_bytes = sum(p.numel() * p.element_size() for p in layer_params)
    if n_bytes > MAX_PACKED_BYTES:
        return f"layer weights of {n_bytes / 2**30:.1f} GiB (a transposed copy is made)"
    return None


def _norm_weight(norm) -> torch.Tensor | None:
    """[w, w]: the LayerNorm weight that makes LayerNorm([x, -x]) RMSNorm(x) * w (module doc)."""
    return None if norm is None else torch.cat([norm.weight, norm.weight]).detach()


@dataclass(frozen=True)
class PackedLayer:
    """One decoder layer's weights as FastDecodeStep uses them (see the module doc)."""

    norm_1: torch.Tensor  # [2H] (LayerNorm over [x, -x])
    w_qkv: torch.Tensor  # [H, 3H]: columns [head, (q|k|v), head_dim] as megatron's rows
    b_qkv: torch.Tensor | None  # [3H] qk_bias in the same layout (zeros for v), or None
    w_proj: torch.Tensor  # [H, H]
    norm_2: torch.Tensor | None
    norm_3: torch.Tensor
    w_fc1: torch.Tensor  # [H, 2F]: gate then up
    w_fc2: torch.Tensor  # [F, H]
    norm_4: torch.Tensor | None

    @classmethod
    def of(cls, layer) -> PackedLayer:
        attn = layer.self_attention
        b_qkv = None
        if attn.qk_bias is not None:
            qk_b = attn.qk_bias.detach()[:, 0].transpose(0, 1)  # [N, 2, hd]
            b_qkv = torch.cat([qk_b, torch.zeros_like(qk_b[:, :1])], 1).reshape(-1)  # v: none
        return cls(
            norm_1=_norm_weight(layer.norm_1),
            w_qkv=attn.linear_qkv.weight.detach().t().contiguous(),
            b_qkv=b_qkv,
            w_proj=attn.linear_proj.weight.detach().t().contiguous(),
            norm_2=_norm_weight(layer.norm_2),
            norm_3=_norm_weight(layer.norm_3),
            w_fc1=layer.mlp.linear_fc1.weight.detach().t().contiguous(),
            w_fc2=layer.mlp.linear_fc2.weight.detach().t().contiguous(),
            norm_4=_norm_weight(layer.norm_4),
        )


class _LayerCache:
    """One layer's cache [B, N, 2 (k|v), capacity, hd] and its k and v views [B, N, C, hd]."""

    __slots__ = ("kv", "k", "v", "native")

    def __init__(self, kv_BN2Ch: torch.Tensor):
        self.kv, self.k, self.v = kv_BN2Ch, kv_BN2Ch[:, :, 0], kv_BN2Ch[:, :, 1]
        self.native = None  # native_kernels.BoundLayer: its layer bound to this cache


class FastDecodeStep:
    """Prelude, core iteration and coda of a decode step over one or several new positions
    (see the module doc)."""

    def __init__(self, model, cache, rope_table, native: bool | None = None):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"fast decode step: not for {reason}")
        cfg = model.cfg
        self.H = cfg.hidden_size
        attn = model.core_block.layers[0].self_attention
        self.N, self.hd = attn.num_heads_local, attn.head_dim
        self.eps = cfg.norm_eps
        self.shape_2H = (2 * self.H,)
        device = model.embedding.weight.device
        self.swap = torch.arange(self.hd, device=device).view(-1, 2).flip(-1).reshape(-1)
        self.F = cfg.ffn_hidden_size
        self.prelude_layers = [PackedLayer.of(layer) for layer in model.prelude_block.layers]
        self.core_layers = [PackedLayer.of(layer) for layer in model.core_block.layers]
        self.coda_layers = [PackedLayer.of(layer) for layer in model.coda_block.layers]
        self.kernels = self._native_kernels(native, device)
        a = model.adapter.weight.detach()  # [H, 2H]: state columns, then embedded-input columns
        self.adapter_s = a[:, : self.H].t().contiguous()
        self.adapter_e = a[:, self.H :].t().contiguous()
        self.ln_f = _norm_weight(model.ln_f)
        head = model.output_layer if model.output_layer is not None else model.embedding
        w_head = head.weight.detach()  # [V, H]
        self.head_t = None  # [H, V] copy when small, for one-row steps (see coda)
        small_head = w_head.numel() * w_head.element_size() <= MAX_HEAD_COPY_BYTES
        if small_head and self.kernels is None:  # with the kernels, one-row steps run in C
            self.head_t = w_head.t().contiguous()
        self.head = w_head
        self.V = w_head.shape[0]
        self.embedding = model.embedding.weight.detach()
        self.scale_embedding = cfg.scale_embedding

        def caches(block, slot, n):  # per layer [B, N, 2, capacity, hd]
            kv_LBN2Ch = cache.view(block, slot).kv_LBN2Ch
            return [_LayerCache(kv_LBN2Ch[i]) for i in range(n)]

        self.prelude_cache = caches("prelude", 0, len(self.prelude_layers))
        self.coda_cache = caches("coda", 0, len(self.coda_layers))
        self.core_cache = [
            caches("core", slot, len(self.core_layers)) for slot in range(cache.core_slots)
        ]
        # RoPE rows for [q, k, v]: v is left as it is (cos 1, sin 0)
        self.cos_C3h = torch.ones(rope_table.capacity, 3, self.hd, device=device)
        self.sin_C3h = torch.zeros_like(self.cos_C3h)
        self.cos_C3h[:, :2] = rope_table.cos_S11h[:, 0]
        self.sin_C3h[:, :2] = rope_table.sin_signed_S11h[:, 0]
        # One position, small heads: RoPE as one mm of the [B * heads, 3 hd] projection with
        # the position's [3 hd, 3 hd] matrix diag(R, R, I); its 4 hd non-identity entries (cos
        # on the diagonal, signed sin at the pair partner) are written once per step. Every
        # step has the cache's batch, so the choice is made once, here.
        w = 3 * self.hd
        j = torch.arange(2 * self.hd, device=device)
        partner = (j // self.hd) * self.hd + self.swap.repeat(2)
        self.rot_index = torch.cat([j * w + j, partner * w + j])
        self.rot_values_C = torch.cat(
            [self.cos_C3h[:, :2].flatten(1), self.sin_C3h[:, :2].flatten(1)], dim=1
        )
        self.rot_33 = torch.eye(w, device=device)
        self.rope_mm = cache.batch * self.N * w * w <= ROPE_MM_MACS
        self.batch, self.capacity = cache.batch, rope_table.capacity
        if self.kernels is not None:
            self._prepare_native(w_head)
        self.set_position(0)

    def _prepare_native(self, w_head) -> None:
        """The native kernels' weights (packed once) and each layer bound to each of its caches
        (native_kernels.BoundLayer, on the _LayerCache); the scratch buffer grows in
        set_position."""
        nk, H = self.kernels, self.H
        cos_Ch, sin_Ch = self.cos_C3h[:, 0], self.sin_C3h[:, 0]  # q and k rows
        scale = 1.0 / math.sqrt(self.hd)
        blocks = [(self.prelude_layers, self.prelude_cache), (self.coda_layers, self.coda_cache)]
        blocks += [(self.core_layers, slot_caches) for slot_caches in self.core_cache]
        packed = {}  # one packed copy per layer, bound to each of its caches (core: per slot)
        for layers, layer_caches in blocks:
            for w, kv in zip(layers, layer_caches):
                if id(w) not in packed:
                    norms = [
                        n if n is None else n[:H] for n in (w.norm_1, w.norm_2, w.norm_3, w.norm_4)
                    ]
                    packed[id(w)] = native_kernels.NativeLayer(
                        nk, w_qkv=w.w_qkv, w_proj=w.w_proj, w_fc1=w.w_fc1, w_fc2=w.w_fc2,
                        b_qkv=w.b_qkv, norms=norms, heads=self.N, hd=self.hd, eps=self.eps,
                    )  # fmt: skip
                kv.native = nk.bind_layer(packed[id(w)], kv.kv, cos_Ch, sin_Ch, scale)
        self.head_native = nk.pack(w_head.t())
        self.adapter_native = nk.pack(self.adapter_s)
        self.ln_f_H = self.ln_f[:H].contiguous()
        self.scratch = torch.empty(0, device=cos_Ch.device)

    def _native_kernels(self, native: bool | None, device: torch.device):
        """native_kernels for the steps of a few rows: True = required (ValueError saying why
        not), False = off, None = when they load and either torch runs one thread or the layers
        are small (`NATIVE_AUTO_LAYER_BYTES`; see the module doc). CPU only."""
        if native is False:
            return None
        if device.type != "cpu":
            if native:
                raise ValueError(f"native_kernels: CPU kernels, the model is on {device}")
            return None
        if native is None and torch.get_num_threads() != 1:
            largest = max(
                sum(t.numel() * t.element_size() for t in (w.w_qkv, w.w_proj, w.w_fc1, w.w_fc2))
                for w in [*self.prelude_layers, *self.core_layers, *self.coda_layers]
            )
            if largest > NATIVE_AUTO_LAYER_BYTES:
                return None
        kernels = native_kernels.load()
        if kernels is None and native:
            raise ValueError(f"native_kernels: unavailable ({native_kernels.unavailable_reason()})")
        return kernels

    def set_position(self, offset: int, length: int = 1) -> None:
        """The positions [offset, offset + length) the next calls decode: their RoPE rows,
        their cache rows and, for several, the causal mask among them."""
        self.offset, self.length = offset, length
        rows = length * self.batch
        self.native_now = self.kernels is not None and rows <= NATIVE_MAX_ROWS
        if self.native_now:
            need = self.kernels.layer_scratch_floats(rows, self.H, self.F, self.capacity)
            if self.scratch.numel() < need:
                self.scratch = torch.empty(need, device=self.scratch.device)
        self.cos, self.sin = self.cos_C3h[offset], self.sin_C3h[offset]  # [3, hd]
        if length == 1 and self.rope_mm:
            self.rot_33.view(-1).index_copy_(0, self.rot_index, self.rot_values_C[offset])
        if length > 1:
            end = offset + length
            self.cos_S113h = self.cos_C3h[offset:end, None, None]
            self.sin_S113h = self.sin_C3h[offset:end, None, None]
            q_pos = torch.arange(offset, end, device=self.swap.device)[:, None]
            self.mask_SL = torch.arange(end, device=self.swap.device)[None, :] <= q_pos

    # ------------------------------------------------------------------ pieces
    def _norm(self, x_BH, w2H):
        # NOTE: method calls (narrow, torch.layer_norm) instead of x[:, :H] and F.layer_norm:
        # indexing with a tuple and the functional wrapper cost microseconds per call here.
        x2 = torch.cat((x_BH, x_BH.neg()), 1)
        y2 = torch.layer_norm(x2, self.shape_2H, w2H, None, self.eps, False)
        return y2.narrow(1, 0, self.H)

    def _attention_1(self, qkv, kv: _LayerCache):
        """One position: RoPE, cache write and attention; o [B, H]."""
        B, pos = qkv.shape[0], self.offset
        if self.rope_mm:
            rot_BN3h = torch.mm(qkv.view(B * self.N, 3 * self.hd), self.rot_33)
            rot_BN3h = rot_BN3h.view(B, self.N, 3, self.hd)
        else:
            qkv_BN3h = qkv.view(B, self.N, 3, self.hd)
            swapped = qkv_BN3h.index_select(3, self.swap)  # pairs (2i, 2i+1) swapped
            rot_BN3h = torch.addcmul(qkv_BN3h * self.cos, swapped, self.sin)
        kv.kv.select(3, pos).copy_(rot_BN3h.narrow(2, 1, 2))  # k and v of this position
        o_BN1h = F.scaled_dot_product_attention(
            rot_BN3h.narrow(2, 0, 1), kv.k.narrow(2, 0, pos + 1), kv.v.narrow(2, 0, pos + 1)
        )
        return o_BN1h.view(B, self.H)

    def _attention_chunk(self, qkv, kv: _LayerCache):
        """S positions (rows in (s, b) order): the same, causal among the new positions."""
        S, pos = self.length, self.offset
        B = qkv.shape[0] // S
        qkv_SBN3h = qkv.view(S, B, self.N, 3, self.hd)
        swapped = qkv_SBN3h.index_select(4, self.swap)
        rot = torch.addcmul(qkv_SBN3h * self.cos_S113h, swapped, self.sin_S113h)
        kv.kv.narrow(3, pos, S).copy_(rot.narrow(3, 1, 2).permute(1, 2, 3, 0, 4))
        o_BNSh = F.scaled_dot_product_attention(
            rot.select(3, 0).permute(1, 2, 0, 3),
            kv.k.narrow(2, 0, pos + S),
            kv.v.narrow(2, 0, pos + S),
            attn_mask=self.mask_SL,
        )
        return o_BNSh.permute(2, 0, 1, 3).reshape(S * B, self.H)

    def _layer(self, x_BH, w: PackedLayer, kv: _LayerCache):
        """One decoder layer over rows x [rows, H] (B rows, or S * B in (s, b) order)."""
        norm = self._norm
        h = norm(x_BH, w.norm_1)
        qkv = torch.mm(h, w.w_qkv) if w.b_qkv is None else torch.addmm(w.b_qkv, h, w.w_qkv)
        o = self._attention_1(qkv, kv) if self.length == 1 else self._attention_chunk(qkv, kv)
        x_BH = torch.addmm(x_BH, o, w.w_proj)
        if w.norm_2 is not None:
            x_BH = norm(x_BH, w.norm_2)
        gate, up = torch.mm(norm(x_BH, w.norm_3), w.w_fc1).view(-1, 2, self.F).unbind(1)
        x_BH = torch.addmm(x_BH, F.silu(gate).mul_(up), w.w_fc2)
        if w.norm_4 is not None:
            x_BH = norm(x_BH, w.norm_4)
        return x_BH

    def _layer_native(self, x_BH, w: PackedLayer, kv: _LayerCache):
        """One decoder layer over the step's rows in one call of the native kernels (the layer
        bound to this cache at construction)."""
        return kv.native(x_BH, torch.empty_like(x_BH), self.offset, self.length, self.scratch)

    def _block(self, x_BH, layers, caches):
        layer = self._layer_native if self.native_now else self._layer
        for w, kv in zip(layers, caches):
            x_BH = layer(x_BH, w, kv)
        return x_BH

    # ------------------------------------------------------------------ the decode API
    # States cross this API as [S, B, H] (the decode loop's layout) and run as rows [S * B, H].
    def prelude(self, ids_BS: torch.Tensor) -> torch.Tensor:
        """e [S, B, H] of the new tokens (embedding, times sqrt(h) when configured, prelude)."""
        B, S = ids_BS.shape
        x = F.embedding(ids_BS.t().reshape(-1) if S > 1 else ids_BS[:, 0], self.embedding)
        if self.scale_embedding:
            x = x * math.sqrt(self.H)
        return self._block(x, self.prelude_layers, self.prelude_cache).view(S, B, self.H)

    def adapter_input(self, e_SBH: torch.Tensor) -> torch.Tensor:
        """e A_e [S * B, H]: the embedded input's share of the adapter, once per position."""
        return torch.mm(e_SBH.reshape(-1, self.H), self.adapter_e)

    def core(self, s_SBH, adapter_in, slot: int) -> torch.Tensor:
        """One core iteration writing core cache slot `slot`: core(s A_s + e A_e)."""
        s_rows = s_SBH.reshape(-1, self.H)
        if self.native_now:
            x = self.kernels.gemm(
                s_rows, self.adapter_native, torch.empty_like(adapter_in), add_MN=adapter_in
            )
        else:
            x = torch.addmm(adapter_in, s_rows, self.adapter_s)
        return self._block(x, self.core_layers, self.core_cache[slot]).view(s_SBH.shape)

    def coda(self, s_SBH) -> torch.Tensor:
        """ln_f -> coda -> ln_f -> head: logits [B, S, V]."""
        S, B = s_SBH.shape[:2]
        if self.native_now:
            nk, rows = self.kernels, s_SBH.reshape(-1, self.H)
            x = nk.rms_norm(rows, self.ln_f_H, self.eps, torch.empty_like(rows))
            x = self._block(x, self.coda_layers, self.coda_cache)
            x = nk.rms_norm(x, self.ln_f_H, self.eps, x)
            logits = nk.gemm(x, self.head_native, x.new_empty(x.shape[0], self.V))
            return logits.view(S, B, -1).transpose(0, 1)
        x = self._norm(s_SBH.reshape(-1, self.H), self.ln_f)
        x = self._norm(self._block(x, self.coda_layers, self.coda_cache), self.ln_f)
        # NOTE: measured with weights out of cache (as in a decode): for one row mm on the
        # transposed copy is faster (0.26 vs 0.43 ms at 8192 x 128), for 8 rows F.linear on the
        # model's own layout (0.77 vs 1.12 ms); the small layers prefer mm at every batch size.
        one_row = x.shape[0] == 1 and self.head_t is not None
        logits = torch.mm(x, self.head_t) if one_row else F.linear(x, self.head)
        return logits.view(S, B, -1).transpose(0, 1)
