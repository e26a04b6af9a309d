"""What training telemetry costs: optimizer steps with telemetry due, not due, and off, measured
side by side (interleaved, in one process) on the real stack (DeepSpeed engine, training step).

    .venv/bin/python bench/telemetry.py                         # CPU, tiny model, ZeRO-2
    .venv/bin/python bench/telemetry.py --optim ellis_adam --zero 1 \
        --data data/bench --model configs/model/bench-0.7b.yaml --r 32 --k 8   # GPU

Three engines of one config: telemetry off (interval 0), on but never due, due every step.
Each round runs one step of each in turn, so machine load affects them alike; the report is
the median of each and the ratios to "off". JSON goes to bench/results/.
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

from bench.train import tiny_dataset  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="prepared dataset (default: a tiny one, built now)")
    p.add_argument("--model", default=str(ROOT / "configs/model/tiny.yaml"))
    p.add_argument("--optim", default="adamw", choices=["adamw", "ellis_adam"])
    p.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench/results"))
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from pipeline.common.distributed import init_process_group
    from pipeline.data.loader import ResumableLoader, open_dataset
    from pipeline.model import build_model
    from pipeline.training.config import load_train_config
    from pipeline.training.hooks import TrainHooks
    from pipeline.training.layout import ParallelDims
    from pipeline.training.parallel import parallelize
    from pipeline.training.rank import RankContext, StopFlag
    from pipeline.training.step import train_step
    from pipeline.training.telemetry import Telemetry

    tmp = Path(tempfile.mkdtemp(prefix="rdpt-bench-telemetry-"))
    data = Path(args.data) if args.data else tiny_dataset(tmp)
    info = open_dataset(data)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    init_process_group(export_env=True)

    def setup(interval: int):
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
                f"optim.name={args.optim}",
                "optim.eps=1e-6",
                "optim.lr=1e-4",
                "optim.warmup_steps=0",
                f"telemetry.interval={interval}",
                "tracking.enabled=false",
            ],
        )
        dims = ParallelDims.from_config(cfg, world_size=1)
        engine = parallelize(lambda dtype: build_model(cfg.model, params_dtype=dtype), dims, cfg)
        tele = Telemetry(engine, cfg)
        ctx = RankContext(cfg, 0, 1, device, tmp / "run", StopFlag())
        return engine, tele, ctx

    cases = {"off": setup(0), "not_due": setup(10**9), "due": setup(1)}
    loader = iter(ResumableLoader(data, micro_batch_size=args.micro_batch, seed=0))
    batches = [next(loader) for _ in range(4)]
    hooks = TrainHooks()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for i in range(args.warmup + args.rounds):
        for name, (engine, tele, ctx) in cases.items():
            sync()
            t0 = time.perf_counter()
            tele.begin(i)
            train_step(engine, batches[i % 4], i, r=args.r, n_grad=args.k, ctx=ctx, hooks=hooks)
            tele.end(i + 1)
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": Path(args.model).stem,
        "optim": args.optim,
        "zero_stage": args.zero,
        "r": args.r,
        "k": args.k,
        "micro_batch": args.micro_batch,
        "rounds": args.rounds,
        "median_step_s": med,
        "ratio_to_off": {k: med[k] / med["off"] for k in med},
    }
    print(f"{'telemetry':<10} {'median step':>12} {'vs off':>8}")
    for k in med:
        print(f"{k:<10} {med[k] * 1e3:10.1f} ms {med[k] / med['off']:8.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = out / f"telemetry-{result['device'].replace(' ', '_')}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
