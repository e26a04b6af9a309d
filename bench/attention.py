"""Causal attention forward + backward, per kernel, side by side: cuDNN SDPA, flash SDPA,
memory-efficient SDPA and FlashAttention (3 or 2, whichever rdpt's attention imports).

Shape (default): B 2, H 16, S 4096, D 128, bf16. FLOPs per call as FlashAttention's own
benchmarks count them: forward 4 B H S^2 D / 2 (two matmuls, half of them masked), backward
2.5 x forward. The answer to "which backend should `auto` prefer on this GPU" (attention.py).
JSON to --out.

    python bench/attention.py --out bench/results      # one CUDA GPU
    python bench/attention.py --dry-run                # settings and the kernels that import
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--dry-run", action="store_true", help="print settings and kernels, run none")
    return p.parse_args(argv)


def kernels() -> dict:
    """name -> callable(q, k, v) on [B, S, H, D] tensors returning the output."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipeline.model.attention import FLASH

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
                )
            return o.transpose(1, 2)

        return run

    out = {
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
    }
    if FLASH is not None:

        def flash(q, k, v):
            o = FLASH.func(q, k, v, causal=True)
            return o[0] if isinstance(o, tuple) else o

        out[f"flash_attn_{FLASH.version}"] = flash
    del torch
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from pipeline.model.attention import FLASH_IMPORT_ERRORS

    settings = {k: getattr(args, k) for k in ("batch", "heads", "seq", "head_dim")}
    names = list(kernels())
    if args.dry_run or not torch.cuda.is_available():
        print(
            json.dumps(
                {
                    "settings": settings,
                    "kernels": names,
                    "flash_import_errors": FLASH_IMPORT_ERRORS,
                    "cuda": torch.cuda.is_available(),
                },
                indent=2,
            )
        )
        return 0 if args.dry_run else 2
    B, H, S, D = args.batch, args.heads, args.seq, args.head_dim
    fwd = 4 * B * H * S * S * D / 2
    total = fwd * 3.5
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        for _ in range(3)
    )
    dout = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    rows = {}
    for name, fn in kernels().items():
        try:
            for _ in range(args.warmup):
                fn(q, k, v).backward(dout)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                fn(q, k, v).backward(dout)
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / args.iters
            rows[name] = {"ms": dt * 1e3, "tflops": total / dt / 1e12}
            print(f"{name:<20} {dt * 1e3:8.2f} ms  {total / dt / 1e12:7.1f} TFLOP/s", flush=True)
        except Exception as e:  # noqa: BLE001 - a kernel this GPU/dtype lacks: recorded
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"{name:<20} FAILED {rows[name]['error']}", flush=True)
        q.grad = k.grad = v.grad = None
    device = torch.cuda.get_device_name()
    record = {
        "what": "causal attention fwd+bwd, bf16, FLOPs = 3.5 x 2 B H S^2 D",
        "device": device,
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": settings,
        "flash_import_errors": FLASH_IMPORT_ERRORS,
        "results": rows,
    }
    from pipeline.common.atomic import atomic_write_json

    out = (
        Path(args.out)
        / f"attention-{device.replace(' ', '_')}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, record)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
