"""Benchmark the full training stack against a bare forward/backward of the same model.

Full stack: DeepSpeed engine built by `parallelize` (ZeRO stage from --zero, compile as
training decides), the training step of pipeline.train (non-finite guard, all-reduced stats)
and RunTracker logging (metrics.jsonl) every step, fed by the ResumableLoader over a prepared
dataset, or with --synthetic by random token batches made in memory (no dataset needed: the
bench-0.7b shape on a fresh GPU machine). Bare: the same model shape in the compute dtype, the
same batches already in memory, compiled the same way, `loss.backward()` and a torch AdamW
step, nothing else. Both run in this process after warm-up steps; reported: median step time,
tokens/s, the stack's overhead, model TFLOP/s and MFU (pipeline/common/mfu.py), peak memory.
With --sampled-r the full stack draws r per step as training does (mean --r, k --k) and its
FLOPs are summed step by step; the bare step runs at the fixed --r. --profile writes the top 20
kernels (by device time) of one profiled full-stack step. JSON goes to --out.

    .venv/bin/python bench/train.py                                  # CPU smoke (tiny model)
    .venv/bin/python bench/train.py --synthetic --model configs/model/bench-0.7b.yaml \
        --seq-len 4096 --r 32 --k 8 --micro-batch 2 --zero 1 --steps 10   # one GPU
    .venv/bin/python bench/train.py --synthetic --dry-run             # settings only

Without --data or --synthetic a tiny dataset is prepared from standard-library text.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
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
    p.add_argument("--data", help="prepared dataset (default: a tiny one, built now)")
    p.add_argument("--synthetic", action="store_true", help="random batches, no dataset")
    p.add_argument("--seq-len", type=int, default=64, help="--synthetic: sequence length")
    p.add_argument("--model", default=str(ROOT / "configs/model/tiny.yaml"))
    p.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--r", type=int, default=4, help="iterations (--sampled-r: their mean)")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--sampled-r", action="store_true", help="draw r per step as training does")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="measured steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--peak-tflops", type=float, default=None, help="default: table by name")
    p.add_argument("--profile", action="store_true", help="top 20 kernels of one step")
    p.add_argument("--out", default=str(ROOT / "bench/results"))
    p.add_argument("--dry-run", action="store_true", help="print the settings, run nothing")
    return p.parse_args(argv)


def tiny_dataset(tmp: Path) -> Path:
    from data_prep.config import PrepConfig
    from data_prep.prep import prepare
    from data_prep.sources import stdlib_root

    root = stdlib_root()
    out = tmp / "data"
    prepare(
        PrepConfig(
            inputs=[str(root / n) for n in ("json", "email", "collections")],
            output=str(out),
            limit_bytes=300_000,
            tokenizer={"vocab_size": 512},
            seq_len=64,
            val_fraction=0.1,
            seqs_per_member=16,
            workers=1,
        )
    )
    return out


def synthetic_batches(vocab: int, seq_len: int, micro_batch: int, seed: int = 0):
    """Endless steps of one random MicroBatch each (the loader's types, made in memory)."""
    import torch

    from pipeline.data.loader import MicroBatch

    g = torch.Generator().manual_seed(seed)
    n = 0
    while True:
        rows = torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=g)
        ids = torch.arange(n, n + micro_batch)
        n += micro_batch
        yield [MicroBatch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous(), ids)]


def timed(fn, steps: int, warmup: int, sync) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def top_kernels(fn, cuda: bool, n: int = 20) -> list[dict]:
    """The n most expensive kernels (device time on CUDA, CPU time otherwise) of one fn()."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
    key = "device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    return [{"name": e.key, "calls": e.count, "time_us": getattr(e, key, 0)} for e in events[:n]]


def main(argv=None) -> int:
    args = parse_args(argv)
    # NOTE: one thread on CPU: on a shared, loaded machine OpenMP spinning made steps 20x slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.dry_run:
        print(json.dumps(vars(args), indent=2))
        return 0
    import torch

    from pipeline.common.config_io import load_config
    from pipeline.common.distributed import init_process_group
    from pipeline.common.mfu import mfu, peak_flops
    from pipeline.data.loader import ResumableLoader, open_dataset
    from pipeline.model import build_model
    from pipeline.model.config import ModelConfig
    from pipeline.model.flops import flops_per_token
    from pipeline.tracking.logger import RunTracker
    from pipeline.training.config import load_train_config
    from pipeline.training.engine import resolve_precision
    from pipeline.training.hooks import TrainHooks
    from pipeline.training.layout import ParallelDims
    from pipeline.training.parallel import compile_enabled, compile_model, parallelize
    from pipeline.training.rank import RankContext, StopFlag
    from pipeline.training.recurrence import sample_iterations
    from pipeline.training.step import train_step

    tmp = Path(tempfile.mkdtemp(prefix="rdpt-bench-train-"))
    if args.synthetic:
        data, seq_len = tmp / "none", args.seq_len
        vocab = load_config(ModelConfig, args.model).vocab_size
    else:
        data = Path(args.data) if args.data else tiny_dataset(tmp)
        info = open_dataset(data)
        seq_len, vocab = info.seq_len, info.vocab_size
    recurrence = (
        ["recurrence.mode=fixed", f"recurrence.fixed={args.r}"]
        if not args.sampled_r
        else [f"recurrence.mean={args.r}"]
    )
    compile_flag = {"auto": "auto", "on": "true", "off": "false"}[args.compile]
    cfg = load_train_config(
        None,
        [
            f"data.path={data}",
            f"model={args.model}",
            f"model.vocab_size={vocab}",
            f"run.dir={tmp / 'run'}",
            f"parallel.zero_stage={args.zero}",
            f"train.micro_batch_size={args.micro_batch}",
            f"train.global_batch_size={args.micro_batch}",
            f"train.compile={compile_flag}",
            *recurrence,
            f"recurrence.backprop_depth={args.k}",
            "optim.lr=1e-4",
            "optim.warmup_steps=0",
            "tracking.enabled=false",
        ],
    )
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    init_process_group(export_env=True)  # DeepSpeed reads the rank variables

    # full stack: the engine exactly as training builds it (parallelize), the real loader (or
    # synthetic batches), the real step (agreement all-reduce, non-finite guard) and logging
    dims = ParallelDims.from_config(cfg, world_size=1)
    stack = [parallelize(lambda dtype: build_model(cfg.model, params_dtype=dtype), dims, cfg)]
    if args.synthetic:
        loader = synthetic_batches(vocab, seq_len, args.micro_batch)
    else:
        loader = iter(ResumableLoader(data, micro_batch_size=args.micro_batch, seed=0))
    tracker = RunTracker(tmp / "run", None, enabled=False, system_metrics_interval=0)
    ctx = RankContext(cfg, 0, 1, device, tmp / "run", StopFlag())
    hooks, step, flops = TrainHooks(), [0], []
    tokens = args.micro_batch * seq_len

    def full_step():
        r, _, n_grad = sample_iterations(cfg.recurrence, step[0])
        batches = next(loader)
        res = train_step(stack[0], batches, step[0], r=r, n_grad=n_grad, ctx=ctx, hooks=hooks)
        tracker.log_metrics({"train/loss": res.loss, "train/grad_norm": res.grad_norm}, step[0])
        flops.append(flops_per_token(cfg.model, r, n_grad, seq_len) * tokens)
        step[0] += 1

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    full = timed(full_step, args.steps, args.warmup, sync)
    full_flops = flops[args.warmup :]
    full_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    kernels = top_kernels(full_step, cuda) if args.profile else None

    # bare forward/backward of the same model shape on in-memory batches, compiled alike
    stack.clear()  # the engine's memory goes before the bare model's is measured
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    dtype = torch.bfloat16 if resolve_precision(cfg) == "bf16" else torch.float32
    model = build_model(cfg.model).to(device=device, dtype=dtype)
    if compile_enabled(cfg):
        compile_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    batch = next(loader)[0]
    x, y = batch.inputs.to(device), batch.targets.to(device)

    def bare_step():
        out = model(x, y, r=args.r, backprop_depth=args.k, sample_ids_B=batch.sample_ids)
        out.loss_BS.float().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    bare = timed(bare_step, args.steps, args.warmup, sync)
    bare_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    tracker.close()

    med_full, med_bare = statistics.median(full), statistics.median(bare)
    bare_flops = flops_per_token(cfg.model, args.r, args.k, seq_len) * tokens
    # full stack: the FLOPs of the measured steps (each with its own r) over their total time
    full_rate = sum(full_flops) / sum(full)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    result = {
        "device": name,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": Path(args.model).stem,
        "synthetic": args.synthetic,
        "zero_stage": args.zero,
        "r": args.r,
        "sampled_r": args.sampled_r,
        "k": args.k,
        "micro_batch": args.micro_batch,
        "seq_len": seq_len,
        "precision": resolve_precision(cfg),
        "compile": compile_enabled(cfg),
        "steps": args.steps,
        "full_stack": {
            "step_s": med_full,
            "tokens_per_s": tokens / med_full,
            "peak_gib": full_peak,
            "total_s": sum(full),
            "model_flops": sum(full_flops),
        },
        "bare": {"step_s": med_bare, "tokens_per_s": tokens / med_bare, "peak_gib": bare_peak},
        "overhead_pct": 100.0 * (med_full - med_bare) / med_bare,
        "model_tflops_full": full_rate / 1e12,
        "model_tflops_bare": bare_flops / med_bare / 1e12,
    }
    if args.sampled_r:
        result["r_drawn"] = [sample_iterations(cfg.recurrence, s)[0] for s in range(step[0])]
    peak = peak_flops(name if cuda else None, args.peak_tflops)
    if peak is not None:
        result["peak_tflops"] = peak / 1e12
        result["mfu_full"] = mfu(sum(full_flops), sum(full), 1, peak)
        result["mfu_bare"] = mfu(bare_flops, med_bare, 1, peak)
    if kernels is not None:
        result["top_kernels"] = kernels
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = name.replace(" ", "_") if cuda else "cpu"
    path = out / f"train-{tag}-z{args.zero}-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    from pipeline.common.atomic import atomic_write_json

    atomic_write_json(path, result)
    print(json.dumps({k: v for k, v in result.items() if k != "top_kernels"}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
