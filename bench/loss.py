"""Peak memory and time of the training loss, unfused (full logits) vs chunked
(model.loss_chunk_tokens), side by side in one run: forward + backward of head + cross entropy
over one micro-batch, through pipeline/model/loss.py with a vocab-parallel head at TP 1.

CPU: each variant runs in a fresh process and reports its resident-memory high-water mark
above the resident memory just before the loss (VmHWM - VmRSS from /proc/self/status; the
process holds only the inputs then). CUDA: torch.cuda.max_memory_allocated above the memory
allocated before the loss, both variants in this process. JSON in bench/results/.

    .venv/bin/python bench/loss.py                       # CPU: B 2, S 2048, h 512, V 32768
    .venv/bin/python bench/loss.py --seq 4096 --hidden 2048 --vocab 65536   # GPU, bench-0.7b
    .venv/bin/python bench/loss.py --dry-run             # the settings, nothing measured
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--chunk-tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--dry-run", action="store_true", help="print the settings and exit")
    p.add_argument("--one", choices=["unfused", "chunked"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _kib(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{name} not in /proc/self/status")


def measure(args, mode: str, device: str) -> dict:
    """Peak extra bytes and median seconds of head + loss forward/backward in `mode`."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from pipeline.model.loss import chunked_cross_entropy, unfused_cross_entropy
    from pipeline.model.runtime import destroy_model_parallel, init_model_parallel

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    init_model_parallel(tp=1, seed=0)
    try:
        g = torch.Generator().manual_seed(0)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        S, B, H, V = args.seq, args.batch, args.hidden, args.vocab
        x = torch.randn(S, B, H, generator=g).to(device, dtype).requires_grad_()
        w = (torch.randn(V, H, generator=g) * 0.02).to(device, dtype).requires_grad_()
        y = torch.randint(0, V, (S, B), generator=g).to(device)

        def head(h):
            return F.linear(h, w)

        def step():
            if mode == "chunked":
                loss = chunked_cross_entropy(head, x, y, args.chunk_tokens)
            else:
                loss = unfused_cross_entropy(head, x, y)
            loss.mean().backward()
            x.grad = w.grad = None

        cuda = device == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _kib("VmRSS")
        step()
        peak = (torch.cuda.max_memory_allocated() if cuda else _kib("VmHWM")) - base
        times = []
        for _ in range(args.repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        times.sort()
        return {"peak_extra_bytes": peak, "step_s": times[len(times) // 2]}
    finally:
        destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:  # a child process measuring one variant (CPU)
        print(json.dumps(measure(args, args.one, device)))
        return 0
    settings = {k: getattr(args, k) for k in ("batch", "seq", "hidden", "vocab", "chunk_tokens")}
    if args.dry_run:
        print(json.dumps({"device": device, **settings}, indent=2))
        return 0
    rows = {}
    for mode in ("unfused", "chunked"):
        if device == "cuda":
            rows[mode] = measure(args, mode, device)
        else:
            cmd = [sys.executable, __file__, "--one", mode] + [
                f"--{k.replace('_', '-')}={v}" for k, v in settings.items()
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
            rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    record = {
        "what": "head + cross entropy, forward + backward, one micro-batch",
        "device": name,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "settings": settings,
        "results": rows,
        "peak_ratio_chunked_over_unfused": rows["chunked"]["peak_extra_bytes"]
        / max(rows["unfused"]["peak_extra_bytes"], 1),
        "time_ratio_chunked_over_unfused": rows["chunked"]["step_s"] / rows["unfused"]["step_s"],
    }
    for mode, r in rows.items():
        print(f"{mode:<8} peak +{r['peak_extra_bytes'] / 2**20:8.1f} MiB  {r['step_s']:.3f} s")
    print(
        f"chunked / unfused: peak {record['peak_ratio_chunked_over_unfused']:.2f}x, "
        f"time {record['time_ratio_chunked_over_unfused']:.2f}x"
    )
    from pipeline.common.atomic import atomic_write_json

    tag = name.replace(" ", "_")
    out = Path(args.out) / f"loss-{tag}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, record)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
