"""Benchmark one training step (forward + backward) of the recurrent-depth model.

GPU (default): the bench-0.7b shape (configs/model/bench-0.7b.yaml), sequence 4096,
micro-batch 2, bf16 parameters, r = 16 and r = 32 with k = 8, for each attention backend,
eager and torch.compile (the regions training compiles: training/parallel.py::compile_model;
Dynamo is reset between configurations, and each row reports the graphs compiled in warm-up and
the recompilations after it; run with TORCH_LOGS=recompiles to see why any happened).
Reports tokens/s, model TFLOP/s (pipeline/model/flops.py accounting, no recompute credit),
MFU against the device's bf16 dense peak (pipeline/common/mfu.py: the table by device name,
or --peak-tflops) and peak memory.

CPU (no CUDA) or --smoke: the tiny shape through the same code path (math + sdpa backends,
eager), in seconds. Results go to bench/results/model-<device>-<time>.json.

    .venv/bin/python bench/model.py                      # GPU table
    .venv/bin/python bench/model.py --smoke              # CPU smoke run (tests call this)
    .venv/bin/python bench/model.py --r 32 --backends sdpa --compile on
"""

from __future__ import annotations

import argparse
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
    p.add_argument(
        "--config", default=None, help="model YAML (default: bench-0.7b on GPU, tiny on CPU)"
    )
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--r", type=int, nargs="+", default=None, help="core iterations (default 16 32)")
    p.add_argument("--k", type=int, default=None, help="backprop depth (default 8)")
    p.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="attention backends (default: flash if importable, sdpa; CPU: math sdpa)",
    )
    p.add_argument("--compile", choices=["off", "on", "both"], default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shape, quick (CPU or GPU)")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak (default: table by name)"
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results directory")
    return p.parse_args(argv)


def settings(args, cuda: bool) -> dict:
    small = args.smoke or not cuda
    from pipeline.model.attention import _flash_attn_func

    default_backends = (
        ["math", "sdpa"]
        if small
        else (["flash"] if _flash_attn_func is not None else []) + ["sdpa"]
    )
    return {
        "config": args.config
        or str(ROOT / "configs/model" / ("tiny.yaml" if small else "bench-0.7b.yaml")),
        "seq_len": args.seq_len or (64 if small else 4096),
        "micro_batch": args.micro_batch or 2,
        "rs": args.r or ([4] if small else [16, 32]),
        "k": args.k or (2 if small else 8),
        "backends": args.backends or default_backends,
        "compile": args.compile or ("off" if small else "both"),
        "warmup": args.warmup if args.warmup is not None else (1 if small else 3),
        "iters": args.iters or (2 if small else 10),
    }


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def bench_one(cfg, *, backend, compiled, r, k, seq_len, mb, warmup, iters, dtype, device):
    import torch

    from pipeline.model import build_model
    from pipeline.model.attention import resolve_backend
    from pipeline.model.flops import flops_per_token

    cfg = cfg.model_copy(update={"attention_backend": backend})
    torch.manual_seed(0)
    with torch.device(device):  # NOTE: megatron's "CPU" init then runs on the GPU (fast)
        model = build_model(cfg, params_dtype=dtype)
    torch._dynamo.reset()  # every configuration compiles from scratch, counted on its own
    if compiled:
        from pipeline.training.parallel import compile_model

        compile_model(model)  # the regions training compiles (one place)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (mb, seq_len), generator=g).to(device)
    labels = torch.randint(0, cfg.vocab_size, (mb, seq_len), generator=g).to(device)

    def step():
        for p in model.parameters():
            p.grad = None
        out = model(ids, labels, r=r, backprop_depth=k, state_seed=0)
        out.loss_BS.float().mean().backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    graphs0 = dynamo_graphs()
    for _ in range(warmup):
        step()
    sync()
    graphs_warm = dynamo_graphs()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    dt = (time.perf_counter() - t0) / iters
    tokens = mb * seq_len
    flops = flops_per_token(cfg, r, k, seq_len) * tokens
    res = {
        "backend": resolve_backend(backend, device, dtype, cfg.head_dim),
        "compile": compiled,
        "r": r,
        "k": k,
        "seq_len": seq_len,
        "micro_batch": mb,
        "step_s": dt,
        "tokens_per_s": tokens / dt,
        "model_flops": flops,
        "compiled_graphs": graphs_warm - graphs0,
        "recompiles_after_warmup": dynamo_graphs() - graphs_warm,
        "tflops": flops / dt / 1e12,
        "peak_mem_gib": (
            torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        ),
    }
    return res


def describe(res: dict) -> str:
    mfu = f"{100 * res['mfu']:.1f}%" if res["mfu"] is not None else "n/a"
    mem = f"{res['peak_mem_gib']:.1f} GiB" if res["peak_mem_gib"] is not None else "n/a"
    return (
        f"{res['tokens_per_s']:,.0f} tok/s  {res['tflops']:.2f} TFLOP/s  MFU {mfu}  "
        f"peak {mem}  ({res['step_s'] * 1e3:.1f} ms/step)  graphs {res['compiled_graphs']}, "
        f"recompiles after warm-up {res['recompiles_after_warmup']}"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from pipeline.common.config_io import load_config
    from pipeline.common.mfu import mfu
    from pipeline.model.config import ModelConfig
    from pipeline.model.runtime import destroy_model_parallel, init_model_parallel

    cuda = torch.cuda.is_available()
    s = settings(args, cuda)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    from pipeline.common.mfu import peak_flops

    peak_fl = peak_flops(device_name if cuda else None, args.peak_tflops)
    peak = peak_fl / 1e12 if peak_fl else None
    cfg = load_config(ModelConfig, s["config"])

    from megatron.core import parallel_state

    owns = not parallel_state.model_parallel_is_initialized()
    if owns:
        init_model_parallel(tp=1, seed=0)
    rows = []
    try:
        compiles = {"off": [False], "on": [True], "both": [False, True]}[s["compile"]]
        for backend in s["backends"]:
            for compiled in compiles:
                for r in s["rs"]:
                    label = (
                        f"{backend:<6} compile={'on ' if compiled else 'off'} r={r:<3} k={s['k']}"
                    )
                    try:
                        res = bench_one(
                            cfg,
                            backend=backend,
                            compiled=compiled,
                            r=r,
                            k=s["k"],
                            seq_len=s["seq_len"],
                            mb=s["micro_batch"],
                            warmup=s["warmup"],
                            iters=s["iters"],
                            dtype=dtype,
                            device=device,
                        )
                    except Exception as e:  # noqa: BLE001 - record (e.g. OOM) and go on
                        res = {
                            "backend": backend,
                            "compile": compiled,
                            "r": r,
                            "k": s["k"],
                            "error": f"{type(e).__name__}: {str(e)[:300]}",
                        }
                        print(f"{label}: FAILED {res['error']}", flush=True)
                        rows.append(res)
                        if cuda:
                            torch.cuda.empty_cache()
                        continue
                    res["mfu"] = (
                        mfu(res["model_flops"], res["step_s"], 1, peak_fl) if peak_fl else None
                    )
                    print(f"{label}: {describe(res)}", flush=True)
                    rows.append(res)
    finally:
        if owns:
            destroy_model_parallel()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    tag = "cpu-smoke" if not cuda else device_name.replace(" ", "_")
    record = {
        "device": device_name,
        "peak_tflops": peak,
        "dtype": str(dtype),
        "settings": s,
        "torch": torch.__version__,
        "megatron_core": _megatron_version(),
        "time": stamp,
        "results": rows,
    }
    from pipeline.common.atomic import atomic_write_json

    out = Path(args.out) / f"model-{tag}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, record)
    print(f"wrote {out}")
    return 0 if rows and all("error" not in r for r in rows if not r.get("compile")) else 1


def _megatron_version() -> str:
    from pipeline.model.compat import megatron_version

    return megatron_version()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
