"""rdpt's CPU decode kernels (native/decode_kernels.c): built with the system C compiler on
first use, cached, loaded with ctypes.

What they are for: a decode step multiplies a few rows (the batch) by each weight matrix.
MKL's sgemm is tuned for large products; for a few rows it spends most of its time outside the
multiply-adds (measured on the 2-core development VM, one thread, weights in L3 as in a decode:
[8, 128] @ [128, 8192] 0.55-1.3 ms in torch.mm across runs, 0.40-0.47 ms here). The kernels
multiply rows by weights packed once into 32-column panels, attend one query per (sequence,
head) over its cached keys in one call (torch's CPU SDPA pays a pair of small GEMM calls per
head), and run a whole decoder layer per call. `FastDecodeStep` (fast_decode.py) uses them for
steps of a few rows.

The build: `cc -O3 -march=native -shared -fPIC` (CC overrides the compiler), into
`$RDPT_CACHE_DIR/kernels` (default ~/.cache/rdpt/kernels) under a name that hashes the source,
the compiler, the flags and the CPU's feature flags, so a home directory shared by different
machines keeps one build per CPU kind. It is written under a temporary name and renamed into
place (two processes building at once both succeed). Like any build cache, the directory should
be writable by its user only: what is there is loaded. Without a compiler, or with
RDPT_NATIVE_KERNELS=0, `load()` returns None and `unavailable_reason()` says why: the decode
then runs torch operations only (same tokens up to last-bit rounding; see fast_decode.py).

    kernels = native_kernels.load()          # None when unavailable
    packed = kernels.pack(w_KN)              # once per weight: [K, N] -> panels
    kernels.gemm(x_MK, packed, out_MN, add=res_MN)   # out = res + x @ w
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native") / "decode_kernels.c"
ABI = 3  # rdpt_kernels_abi() of the source this module is written against
PANEL = 32
FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC"]
ARCH_FLAGS = ["-march=native"]  # dropped (with a retry) where the compiler refuses it

_results: dict[tuple, tuple[NativeKernels | None, str | None]] = {}  # per (switch, CC, cache)


def cache_dir() -> Path:
    root = os.environ.get("RDPT_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "rdpt") / "kernels"


def _cpu_signature() -> str:
    """The CPU's feature flags (what -march=native compiles for), else the platform's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc  # a missing one fails the build, with its error
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(cc: str) -> Path:
    """Compile SOURCE into the cache (or find it there); returns the shared library's path."""
    source = SOURCE.read_bytes()
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for arch in (ARCH_FLAGS, []):
        flags = FLAGS + arch
        key = hashlib.sha256(
            b"\0".join([source, cc.encode(), " ".join(flags).encode(), _cpu_signature().encode()])
        ).hexdigest()[:16]
        lib = out_dir / f"decode_kernels-{key}.so"
        if lib.exists():
            return lib
        fd, tmp = tempfile.mkstemp(prefix=lib.name + ".", suffix=".tmp", dir=out_dir)
        os.close(fd)
        try:
            proc = subprocess.run(
                [cc, *flags, "-o", tmp, str(SOURCE), "-lm"],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode == 0:
                os.replace(tmp, lib)
                return lib
            errors.append(f"{cc} {' '.join(flags)}: {proc.stderr.strip()[-500:]}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("; ".join(errors))


def _settings() -> tuple:
    """What decides load()'s result: the switch, the compiler and the cache directory."""
    switch = os.environ.get("RDPT_NATIVE_KERNELS", "1").strip().lower()
    return switch not in ("0", "false", "no", "off"), _compiler(), str(cache_dir())


def load() -> NativeKernels | None:
    """The kernels (built on first use), or None when they are unavailable (see
    `unavailable_reason`). Built and loaded once per process and setting (RDPT_NATIVE_KERNELS,
    CC, RDPT_CACHE_DIR)."""
    return _result()[0]


def unavailable_reason() -> str | None:
    """Why `load()` returns None under the current settings (None: it does not)."""
    return _result()[1]


def _result() -> tuple[NativeKernels | None, str | None]:
    key = _settings()
    if key not in _results:
        _results[key] = _load(*key)
    return _results[key]


def _load(enabled: bool, cc: str | None, _cache: str) -> tuple[NativeKernels | None, str | None]:
    if not enabled:
        return None, "RDPT_NATIVE_KERNELS=0"
    if cc is None:
        return None, "no C compiler found (cc, gcc, clang; or set CC)"
    try:
        return NativeKernels(ctypes.CDLL(str(_build(cc)))), None
    except (OSError, RuntimeError) as exc:
        return None, f"build or load failed: {exc}"


def _check_f32_cpu(t: torch.Tensor, name: str) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise ValueError(
            f"{name}: the CPU kernels take float32 CPU tensors, got {t.dtype} on {t.device}"
        )


class NativeKernels:
    """ctypes bindings of decode_kernels.c (the shapes are checked here, not in C)."""

    def __init__(self, lib: ctypes.CDLL):
        if lib.rdpt_kernels_abi() != ABI:
            raise RuntimeError(f"decode kernels ABI {lib.rdpt_kernels_abi()}, expected {ABI}")
        p, i, f = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
        self._pack = lib.rdpt_pack_panels
        self._pack.argtypes = [p, i, i, p]
        self._pack.restype = None
        self._gemm = lib.rdpt_gemm_rows
        self._gemm.argtypes = [p, i, p, i, i, p, i, p, p, i, i]
        self._gemm.restype = None
        self._attend = lib.rdpt_attend_one
        self._attend.argtypes = [p, i, i, p, p, i, i, i, i, i, i, f, p, p]
        self._attend.restype = None
        self._norm = lib.rdpt_rms_norm
        self._norm.argtypes = [p, i, p, f, p, i, i, i]
        self._norm.restype = None
        self._layer = lib.rdpt_decoder_layer
        self._layer.argtypes = [p, p, i, i, i, i, i, i, f, *[p] * 11, i, p, i, i, i, i, f, p]
        self._layer.restype = None

    def pack(self, w_KN: torch.Tensor) -> PackedWeight:
        """w [K, N] (x @ w) as panels of 32 columns, the last zero-padded."""
        _check_f32_cpu(w_KN, "pack")
        w_KN = w_KN.detach().contiguous()
        K, N = w_KN.shape
        panels = torch.empty((N + PANEL - 1) // PANEL * K * PANEL, dtype=torch.float32)
        self._pack(w_KN.data_ptr(), K, N, panels.data_ptr())
        return PackedWeight(panels, K, N)

    def gemm(self, x_MK, w: PackedWeight, out_MN, add_MN=None, bias_N=None) -> torch.Tensor:
        """out = add + bias + x @ w (add, bias optional). x and add: rows with unit column
        stride (a narrowed view is fine); out: contiguous rows (may be add)."""
        M, K = x_MK.shape
        rows = [x_MK, out_MN] + ([] if add_MN is None else [add_MN])
        for t in rows:
            _check_f32_cpu(t, "gemm")
        bad_bias = bias_N is not None and bias_N.shape != (w.N,)
        if K != w.K or out_MN.shape != (M, w.N) or any(t.stride(1) != 1 for t in rows) or bad_bias:
            raise ValueError(
                f"gemm: x {tuple(x_MK.shape)} @ w [{w.K}, {w.N}] into {tuple(out_MN.shape)} "
                "(rows with unit column stride; add [M, N], bias [N])"
            )
        self._gemm(
            x_MK.data_ptr(),
            x_MK.stride(0),
            w.panels.data_ptr(),
            w.K,
            w.N,
            None if add_MN is None else add_MN.data_ptr(),
            0 if add_MN is None else add_MN.stride(0),
            None if bias_N is None else bias_N.data_ptr(),
            out_MN.data_ptr(),
            out_MN.stride(0),
            M,
        )
        return out_MN

    def attend_one(self, q_BNh, k_BNCh, v_BNCh, length: int, scores_C, out_BH, scale: float):
        """softmax(q k^T * scale) v of one query per (b, n) over positions [0, length):
        q [B, heads, hd] and k, v [B, heads, >= length, hd] with unit stride over hd and
        positions hd apart (the static cache's layout); out [B, heads * hd]."""
        B, N, hd = q_BNh.shape
        for t in (q_BNh, k_BNCh, v_BNCh, scores_C, out_BH):
            _check_f32_cpu(t, "attend_one")
        if out_BH.shape != (B, N * hd) or not out_BH.is_contiguous():
            raise ValueError(f"attend_one: out must be [{B}, {N * hd}] contiguous")
        if k_BNCh.stride() != v_BNCh.stride() or k_BNCh.stride(2) != hd or k_BNCh.stride(3) != 1:
            raise ValueError("attend_one: keys and values must be [B, heads, positions, hd] rows")
        if not 0 < length <= min(k_BNCh.shape[2], scores_C.numel()) or q_BNh.stride(2) != 1:
            raise ValueError(f"attend_one: {length} positions of a cache {tuple(k_BNCh.shape)}")
        self._attend(
            q_BNh.data_ptr(),
            q_BNh.stride(0),
            q_BNh.stride(1),
            k_BNCh.data_ptr(),
            v_BNCh.data_ptr(),
            k_BNCh.stride(0),
            k_BNCh.stride(1),
            B,
            N,
            hd,
            length,
            scale,
            scores_C.data_ptr(),
            out_BH.data_ptr(),
        )
        return out_BH

    def rms_norm(self, x_MH, w_H, eps: float, out_MH) -> torch.Tensor:
        """out = x / sqrt(mean(x^2) + eps) * w per row (x rows with unit column stride)."""
        M, H = x_MH.shape
        if (
            w_H.shape != (H,)
            or out_MH.shape != (M, H)
            or x_MH.stride(1) != 1
            or out_MH.stride(1) != 1
        ):
            raise ValueError(
                f"rms_norm: x {tuple(x_MH.shape)}, w {tuple(w_H.shape)}, out {tuple(out_MH.shape)}"
            )
        self._norm(
            x_MH.data_ptr(),
            x_MH.stride(0),
            w_H.data_ptr(),
            eps,
            out_MH.data_ptr(),
            out_MH.stride(0),
            M,
            H,
        )
        return out_MH

    def bind_layer(self, layer: NativeLayer, kv_BN2Ch, cos_Ch, sin_Ch, scale: float) -> BoundLayer:
        """One decoder layer (decode_kernels.c: rdpt_decoder_layer) bound to its cache
        [B, heads, 2, capacity, hd] and the RoPE tables cos, sin [>= capacity, hd] (unit stride
        over hd) for a whole decode: what stays fixed is checked here, once, and the call checks
        only what changes (see BoundLayer)."""
        for t in (kv_BN2Ch, cos_Ch, sin_Ch):
            _check_f32_cpu(t, "decoder_layer")
        heads, hd = layer.heads, layer.hd
        if kv_BN2Ch.dim() != 5 or kv_BN2Ch.shape[1] != heads or kv_BN2Ch.shape[4] != hd:
            raise ValueError(f"decoder_layer: a cache {tuple(kv_BN2Ch.shape)} for {heads} x {hd}")
        if kv_BN2Ch.stride(3) != hd or kv_BN2Ch.stride(4) != 1:
            raise ValueError("decoder_layer: cache positions must be rows of hd, hd apart")
        if (
            cos_Ch.stride() != sin_Ch.stride()
            or cos_Ch.stride(1) != 1
            or cos_Ch.shape != sin_Ch.shape
            or cos_Ch.shape[0] < kv_BN2Ch.shape[3]
            or cos_Ch.shape[1] != hd
        ):
            raise ValueError(
                f"decoder_layer: RoPE tables {tuple(cos_Ch.shape)}, {tuple(sin_Ch.shape)} of "
                "one layout and a row per cache position"
            )
        return BoundLayer(self._layer, layer, kv_BN2Ch, cos_Ch, sin_Ch, scale)

    @staticmethod
    def layer_scratch_floats(rows: int, H: int, F: int, positions: int) -> int:
        """decoder_layer's scratch for `rows` rows attending over up to `positions` keys."""
        return rows * (6 * H + 3 * F) + positions


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


class BoundLayer:
    """NativeKernels.bind_layer's result: call it with x [S * B, H] (contiguous, rows in (s, b)
    order), out of the same shape, the first position `pos` and a float32 scratch buffer of
    at least layer_scratch_floats(S * B, H, F, pos + S) floats. It writes the S positions' keys
    and values into the cache at [pos, pos + S) and attends causally among them. The pointers
    of the fixed tensors are taken once; the tensors are kept alive here."""

    __slots__ = ("_fn", "_tensors", "_weights", "_cache", "_rows_B", "_H", "_F", "_capacity",
                 "_cos", "_sin", "_rope_step", "_scale")  # fmt: skip

    def __init__(self, fn, layer: NativeLayer, kv_BN2Ch, cos_Ch, sin_Ch, scale: float):
        self._fn, self._tensors = fn, (layer, kv_BN2Ch, cos_Ch, sin_Ch)
        self._rows_B, self._capacity = kv_BN2Ch.shape[0], kv_BN2Ch.shape[3]
        self._H, self._F = layer.heads * layer.hd, layer.F
        self._weights = (
            self._H, layer.heads, layer.hd, layer.F, layer.eps,
            _ptr(layer.norm_1), _ptr(layer.norm_2), _ptr(layer.norm_3), _ptr(layer.norm_4),
            layer.qkv.panels.data_ptr(), _ptr(layer.b_qkv), layer.proj.panels.data_ptr(),
            layer.fc1.panels.data_ptr(), layer.fc2.panels.data_ptr(),
        )  # fmt: skip
        self._cos, self._sin = cos_Ch.data_ptr(), sin_Ch.data_ptr()
        self._rope_step = cos_Ch.stride(0)
        self._cache = (
            kv_BN2Ch.data_ptr(), kv_BN2Ch.stride(0), kv_BN2Ch.stride(1), kv_BN2Ch.stride(2),
        )  # fmt: skip
        self._scale = scale

    def __call__(self, x_RH, out_RH, pos: int, S: int, scratch) -> torch.Tensor:
        R, H = x_RH.shape
        f32 = torch.float32
        if x_RH.dtype != f32 or out_RH.dtype != f32 or scratch.dtype != f32:
            raise ValueError("decoder_layer: x, out and scratch must be float32")
        if R != S * self._rows_B or not 0 <= pos <= self._capacity - S:
            raise ValueError(
                f"decoder_layer: {R} rows at positions {pos}..{pos + S - 1} of a cache of "
                f"{self._rows_B} sequences x {self._capacity} positions"
            )
        need = NativeKernels.layer_scratch_floats(R, H, self._F, pos + S)
        if (
            H != self._H
            or not x_RH.is_contiguous()
            or out_RH.shape != x_RH.shape
            or not out_RH.is_contiguous()
            or scratch.numel() < need
        ):
            raise ValueError(
                f"decoder_layer: x {tuple(x_RH.shape)} (contiguous, rows of {self._H}), out of "
                f"the same shape and {need} floats of scratch; got out {tuple(out_RH.shape)}, "
                f"{scratch.numel()}"
            )
        rope = pos * self._rope_step * 4  # bytes to the position's row of the RoPE tables
        self._fn(
            x_RH.data_ptr(), out_RH.data_ptr(), S, self._rows_B, *self._weights,
            self._cos + rope, self._sin + rope, self._rope_step, *self._cache, pos, self._scale,
            scratch.data_ptr(),
        )  # fmt: skip
        return out_RH


class NativeLayer:
    """One decoder layer's weights as rdpt_decoder_layer takes them: the four products packed,
    norm weights [H] (None: no such norm), the qkv bias [3H] or None."""

    __slots__ = ("qkv", "proj", "fc1", "fc2", "b_qkv", "norm_1", "norm_2", "norm_3", "norm_4",
                 "heads", "hd", "F", "eps")  # fmt: skip

    def __init__(self, kernels: NativeKernels, *, w_qkv, w_proj, w_fc1, w_fc2, b_qkv, norms,
                 heads: int, hd: int, eps: float):  # fmt: skip
        self.qkv, self.proj = kernels.pack(w_qkv), kernels.pack(w_proj)
        self.fc1, self.fc2 = kernels.pack(w_fc1), kernels.pack(w_fc2)
        self.b_qkv = None if b_qkv is None else b_qkv.detach().contiguous()
        self.norm_1, self.norm_2, self.norm_3, self.norm_4 = (
            None if n is None else n.detach().contiguous() for n in norms
        )
        if self.norm_1 is None or self.norm_3 is None:
            raise ValueError("decoder_layer: needs the pre-attention and pre-MLP norms")
        H, F = heads * hd, w_fc2.shape[0]
        shapes = [tuple(w.shape) for w in (w_qkv, w_proj, w_fc1, w_fc2)]
        if shapes != [(H, 3 * H), (H, H), (H, 2 * F), (F, H)]:
            raise ValueError(f"decoder_layer: weights {shapes} for {heads} heads of {hd}")
        self.heads, self.hd, self.F, self.eps = heads, hd, F, eps


class PackedWeight:
    """A weight [K, N] packed for NativeKernels.gemm."""

    __slots__ = ("panels", "K", "N")

    def __init__(self, panels: torch.Tensor, K: int, N: int):
        self.panels, self.K, self.N = panels, K, N
