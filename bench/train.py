"""Benchmark the full training stack against a bare forward/backward of the same model.

Full stack: DeepSpeed engine (ZeRO stage from --zero), ResumableLoader over a real prepared
dataset, the training step of pipeline.train (non-finite guard, all-reduced stats) and
RunTracker logging (metrics.jsonl) every step. Bare: the same model shape, the same batches
already in memory, `loss.backward()` and a torch AdamW step, nothing else. Both run in this
process at a fixed r (and k), after warm-up steps; the report is the median step time,
tokens/s, the stack's overhead and (on GPU) MFU. JSON goes to bench/results/.

    .venv/bin/python bench/train.py                                  # CPU smoke (tiny model)
    .venv/bin/python bench/train.py --data data/bench --model configs/model/bench-0.7b.yaml \
        --r 32 --k 8 --micro-batch 2 --zero 1 --steps 20                # GPU (one device)

Without --data a tiny dataset is prepared from standard-library text in a temporary dir.
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="prepared dataset (default: a tiny one, built now)")
    p.add_argument("--model", default=str(ROOT / "configs/model/tiny.yaml"))
    p.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="measured steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="default: table by name")
    p.add_argument("--out", default=str(ROOT / "bench/results"))
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


def main(argv=None) -> int:
    args = parse_args(argv)
    # NOTE: one thread on CPU: on a shared, loaded machine OpenMP spinning made steps 20x slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from pipeline.common.distributed import init_process_group
    from pipeline.common.mfu import mfu, peak_flops
    from pipeline.data.loader import ResumableLoader, open_dataset
    from pipeline.model import build_model
    from pipeline.model.flops import flops_per_token
    from pipeline.tracking.logger import RunTracker
    from pipeline.training.config import load_train_config
    from pipeline.training.engine import resolve_precision
    from pipeline.training.hooks import TrainHooks
    from pipeline.training.layout import ParallelDims
    from pipeline.training.parallel import parallelize
    from pipeline.training.rank import RankContext, StopFlag
    from pipeline.training.step import train_step

    tmp = Path(tempfile.mkdtemp(prefix="rdpt-bench-train-"))
    data = Path(args.data) if args.data else tiny_dataset(tmp)
    info = open_dataset(data)
    cfg = load_train_config(
        None,
        [
            f"data.path={data}",
            f"model={args.model}",
            f"model.vocab_size={info.vocab_size}",
            f"run.dir={tmp / 'run'}",
            f"parallel.zero_stage={args.zero}",
            f"train.micro_batch_size={args.micro_batch}",
            f"train.global_batch_size={args.micro_batch}",
            "recurrence.mode=fixed",
            f"recurrence.fixed={args.r}",
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

    # full stack: the engine exactly as training builds it (parallelize), the real loader,
    # the real step (agreement all-reduce, non-finite guard) and metrics logging
    dims = ParallelDims.from_config(cfg, world_size=1)
    engine = parallelize(lambda dtype: build_model(cfg.model, params_dtype=dtype), dims, cfg)
    loader = iter(ResumableLoader(data, micro_batch_size=args.micro_batch, seed=0))
    tracker = RunTracker(tmp / "run", None, enabled=False, system_metrics_interval=0)
    ctx = RankContext(cfg, 0, 1, device, tmp / "run", StopFlag())
    hooks, step = TrainHooks(), [0]

    def full_step():
        batches = next(loader)
        res = train_step(engine, batches, step[0], r=args.r, n_grad=args.k, ctx=ctx, hooks=hooks)
        tracker.log_metrics({"train/loss": res.loss, "train/grad_norm": res.grad_norm}, step[0])
        step[0] += 1

    full = timed(full_step, args.steps, args.warmup, sync)

    # bare forward/backward of the same model shape on in-memory batches
    dtype = torch.bfloat16 if resolve_precision(cfg) == "bf16" else torch.float32
    model = build_model(cfg.model).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    batch = next(loader)[0]
    x, y = batch.inputs.to(device), batch.targets.to(device)

    def bare_step():
        out = model(x, y, r=args.r, backprop_depth=args.k, sample_ids_B=batch.sample_ids)
        out.loss_BS.float().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    bare = timed(bare_step, args.steps, args.warmup, sync)
    tracker.close()

    tokens = args.micro_batch * info.seq_len
    med_full, med_bare = statistics.median(full), statistics.median(bare)
    fpt = flops_per_token(cfg.model, args.r, args.k, info.seq_len)
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": Path(args.model).stem,
        "zero_stage": args.zero,
        "r": args.r,
        "k": args.k,
        "micro_batch": args.micro_batch,
        "seq_len": info.seq_len,
        "precision": resolve_precision(cfg),
        "steps": args.steps,
        "full_stack": {"step_s": med_full, "tokens_per_s": tokens / med_full},
        "bare": {"step_s": med_bare, "tokens_per_s": tokens / med_bare},
        "overhead_pct": 100.0 * (med_full - med_bare) / med_bare,
        "model_tflops_full": fpt * tokens / med_full / 1e12,
    }
    peak = peak_flops(result["device"] if cuda else None, args.peak_tflops)
    if peak is not None:
        result["peak_tflops"] = peak / 1e12
        result["mfu_full"] = mfu(fpt * tokens, med_full, 1, peak)
        result["mfu_bare"] = mfu(fpt * tokens, med_bare, 1, peak)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"train-{'gpu' if cuda else 'cpu'}-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    (out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
