"""`make demo`: the whole product end to end on the embedded default, on CPU.

1. a local MLflow server (sqlite + local artifacts, 127.0.0.1) unless MLFLOW_TRACKING_URI is set;
2. `rdpt prep` of the embedded corpus (the first 8 MB of the interpreter's standard library);
3. `rdpt train` of the tiny model with 2 processes under ZeRO-2, sized to end within about
   five minutes on a slow 2-core machine (100 steps of 8 x 256 tokens);
4. `rdpt eval` of the final checkpoint at r = 1..16.

Every step is the real CLI, run as a subprocess, exactly as a user would type it; each step is
skipped when its output already exists, so `make demo` is idempotent and resumable.
Outputs go under ./demo/ (DEMO_DIR to change).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: configs/ are relative to it
TRAIN = [
    "train.max_steps=100",
    "train.global_batch_size=8",
    "optim.warmup_steps=10",
    "checkpoint.interval=50",
    "eval.interval=50",
    "eval.max_sequences=16",
]


def rdpt(*args: str) -> None:
    cmd = [sys.executable, "-m", "pipeline", *args]
    print(f"\n$ rdpt {' '.join(args)}", flush=True)
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"  ({time.monotonic() - t0:.0f} s)", flush=True)


def ensure_tracking(demo_dir: Path) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        print(f"using MLFLOW_TRACKING_URI={uri}")
        return uri
    rdpt("mlflow-server", "start", "--root", str(demo_dir / "mlflow"))
    uri = (demo_dir / "mlflow" / "server.url").read_text().strip()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def training_summary(metrics_jsonl: Path) -> tuple[tuple | None, tuple | None]:
    """(mean of the first 3 and last 3 logged train losses), (first and last val/loss_r1);
    the last line per step counts (a resumed run may repeat steps)."""
    by_step: dict[int, dict] = {}
    for line in metrics_jsonl.read_text().splitlines():
        rec = json.loads(line)
        by_step.setdefault(rec["step"], {}).update(rec)
    rows = [by_step[k] for k in sorted(by_step)]
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    val = [r["val/loss_r1"] for r in rows if "val/loss_r1" in r]
    t = (sum(train[:3]) / len(train[:3]), sum(train[-3:]) / len(train[-3:])) if train else None
    return t, ((val[0], val[-1]) if val else None)


def training_rate(metrics_jsonl: Path) -> float | None:
    rates = sorted(
        rec["train/tokens_per_s"]
        for rec in map(json.loads, metrics_jsonl.read_text().splitlines())
        if "train/tokens_per_s" in rec
    )
    return rates[len(rates) // 2] if rates else None


def main() -> int:
    demo_dir = Path(os.environ.get("DEMO_DIR", ROOT / "demo")).resolve()
    demo_dir.mkdir(parents=True, exist_ok=True)
    data_dir = demo_dir / "data"
    run_dir = demo_dir / "runs" / "tiny"
    uri = ensure_tracking(demo_dir)

    if (data_dir / "manifest.json").is_file():
        print(f"\ndataset already prepared: {data_dir}")
    else:
        rdpt("prep", "configs/data/demo.yaml", f"output={data_dir}", "limit_bytes=8000000")
    rdpt("prep", "inspect", str(data_dir))

    rdpt(
        "train",
        "configs/train/tiny.yaml",
        f"data.path={data_dir}",
        f"run.dir={run_dir}",
        "run.name=demo-tiny",
        f"tracking.uri={uri}",
        *TRAIN,
        "--nproc",
        "2",
        "--resume",
        "auto",
    )
    eval_json = run_dir / "eval-demo.json"
    rdpt(
        "eval",
        str(run_dir),
        "--recurrences",
        "1,2,4,8,16",
        "--state-init",
        "zero",
        "--max-sequences",
        "16",
        "--json",
        str(eval_json),
    )

    results = json.loads(eval_json.read_text())
    train, val = training_summary(run_dir / "metrics.jsonl")
    print("\n== demo summary ==")
    print(f"dataset      {data_dir}")
    print(f"run dir      {run_dir}")
    print(f"eval json    {eval_json}")
    print(f"MLflow UI    {uri}")
    if train:
        print(f"train loss   {train[0]:.3f} (first 3 logs) -> {train[1]:.3f} (last 3 logs)")
    rate = training_rate(run_dir / "metrics.jsonl")
    if rate:
        print(f"throughput   {rate:.0f} tokens/s (median over the logged steps, 2 processes)")
    if val:
        print(f"val loss r=1 {val[0]:.3f} (first validation) -> {val[1]:.3f} (last)")
    depth = results.get("depth", results)
    print("r    loss     ppl")
    for r, v in sorted(((int(k), v) for k, v in depth.items() if str(k).isdigit())):
        print(f"{r:<4} {v['loss']:<8.4f} {v['ppl']:.2f}")
    print(
        "\nstop the MLflow server with: .venv/bin/rdpt mlflow-server stop "
        f"--root {demo_dir / 'mlflow'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
