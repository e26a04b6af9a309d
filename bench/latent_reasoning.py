"""The latent-reasoning experiment: depth vs a same-compute r = 1 model vs pause tokens vs
continuous thought (and the language chain of thought), on the arithmetic task, on CPU.

    .venv/bin/python bench/latent_reasoning.py --quick     # a few steps each: checks the pipeline
    .venv/bin/python bench/latent_reasoning.py             # the experiment (see the budget below)
    .venv/bin/python bench/latent_reasoning.py --methods recurrent,r1 --max-steps 4000

Every method is an ordinary `rdpt train` run of configs/train/task-tiny.yaml on one
`rdpt prep --task arithmetic` dataset, then `rdpt eval --task` on its test split:

- recurrent: tiny, r drawn around r-bar 4 (k = 2); question => answer; evaluated at
  r = 1, 2, 4, 8, 16;
- r1: tiny with 4x the core layers at r = 1 (the FLOPs per token of the recurrent model at
  r = 4, with more parameters); question => answer;
- pause: tiny at r = 1 trained with 8 pause tokens before `=>`; evaluated with 0 and 8;
- coconut: tiny at r = 1 from scratch, the curriculum with c = 1 thought per replaced step and
  every example padded to stage x c thoughts (coconut.pad_thoughts), stages 0 (the chain of
  thought) to the largest number of steps sharing --max-steps equally; evaluated with 0 to
  the largest number of thoughts;
- cot: tiny at r = 1 with the language reasoning steps (the text baseline);
- coconut_cot: the Coconut authors' recipe: the same curriculum from stage 1, starting from
  the cot run's weights (model.init_from; run `cot` first in the same --work), stages 1 to
  the largest sharing --max-steps (so it trains twice the steps of the others, counting the
  cot run).

The JSON (every eval point, the settings, the machine and date), a markdown table of
accuracy per difficulty, and accuracy_vs_flops.png (one line per method) go to
bench/results/latent-reasoning-<cpu|gpu>-<time>.{json,md,png}. Budget: the default run sizes
each method for at most ~30 min on 2 CPU cores (train.max_steps = --max-steps); --quick is a
smoke run of the same pipeline at a tiny size, whose accuracies mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/train/task-tiny.yaml"

METHODS = {
    # name: (train overrides, eval flags)
    "recurrent": (
        ["data.reasoning_steps=drop", "recurrence.mode=random", "recurrence.mean=4"],
        ["--recurrences", "1,2,4,8,16"],
    ),
    "r1": (
        [
            "data.reasoning_steps=drop",
            "recurrence.mode=fixed",
            "recurrence.fixed=1",
            "recurrence.mean=1",
            "recurrence.backprop_depth=1",
            "model.n_core=8",
        ],
        ["--recurrences", "1"],
    ),
    "pause": (
        [
            "data.reasoning_steps=drop",
            "data.pause.count=8",
            "recurrence.mode=fixed",
            "recurrence.fixed=1",
            "recurrence.mean=1",
            "recurrence.backprop_depth=1",
        ],
        ["--recurrences", "1", "--pause", "0,8", "--task-r", "1"],
    ),
    "coconut": (
        [
            "train.stage=coconut",
            "coconut.thoughts_per_step=1",
            "coconut.pad_thoughts=true",
            "recurrence.mode=fixed",
            "recurrence.fixed=1",
            "recurrence.mean=1",
            "recurrence.backprop_depth=1",
        ],
        ["--recurrences", "1", "--task-r", "1"],
    ),
    "cot": (
        [
            "recurrence.mode=fixed",
            "recurrence.fixed=1",
            "recurrence.mean=1",
            "recurrence.backprop_depth=1",
        ],
        ["--recurrences", "1"],
    ),
    "coconut_cot": (
        [
            "train.stage=coconut",
            "coconut.thoughts_per_step=1",
            "coconut.pad_thoughts=true",
            "coconut.first_stage=1",
            "recurrence.mode=fixed",
            "recurrence.fixed=1",
            "recurrence.mean=1",
            "recurrence.backprop_depth=1",
        ],
        ["--recurrences", "1", "--task-r", "1"],
    ),
}


def method_plan(method: str, hi: int, max_steps: int, work: Path) -> tuple[list, list]:
    """(train overrides, eval flags) of `method`; Coconut's curriculum is sized here: c = 1
    thought per replaced step, the stages sharing max_steps equally."""
    train, flags = list(METHODS[method][0]), list(METHODS[method][1])
    if method.startswith("coconut"):
        n_stages = hi + 1  # stages 0 (chain of thought) .. hi
        if method == "coconut_cot":
            train.append(f"model.init_from={work / 'runs' / 'cot'}")
            n_stages = hi  # stages 1 .. hi
        steps_per_stage = max(max_steps // n_stages, 1)
        train += [f"coconut.max_stages={hi}", f"coconut.steps_per_stage={steps_per_stage}"]
        flags += ["--thoughts", ",".join(str(n) for n in range(hi + 1))]
    return train, flags


def run(cmd: list[str], log: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run of the whole pipeline")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--max-steps", type=int, default=3000, help="optimizer steps per method")
    p.add_argument("--steps", default="1,6", help="reasoning steps range of the task")
    p.add_argument("--train-examples", type=int, default=20000)
    p.add_argument("--test-examples", type=int, default=500)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a train override for every method (repeatable), e.g. --set optim.lr=1e-3",
    )  # fmt: skip
    p.add_argument("--work", default=None, help="folder for data and runs (default: a temp dir)")
    p.add_argument("--out", default=str(ROOT / "bench/results"))
    p.add_argument(
        "--reuse", action="store_true",
        help="take a method's finished run and evaluation from --work instead of redoing them "
        "(methods run as separate invocations, then one --reuse call writes the record)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.max_steps, args.train_examples, args.test_examples = 6, 256, 24
        args.steps, args.nproc = "1,3", 1
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown} (one of {sorted(METHODS)})")
    lo, hi = (int(x) for x in args.steps.split(","))
    work = Path(args.work or tempfile.mkdtemp(prefix="rdpt-latent-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    py = [sys.executable, "-m", "pipeline"]
    data = work / "arith"
    run(
        [
            *py, "prep", "--task", "arithmetic", "--output", str(data),
            f"arithmetic.steps=[{lo},{hi}]", f"sizes.train={args.train_examples}",
            "sizes.val=64", f"sizes.test={args.test_examples}",
        ],
        log,
    )  # fmt: skip
    batch = ["train.global_batch_size=16", "train.micro_batch_size=8"] if args.quick else []
    results, timings = {}, {}
    plans = {m: method_plan(m, hi, args.max_steps, work) for m in methods}
    for method in methods:
        train_overrides, eval_flags = plans[method]
        run_dir = work / "runs" / method
        out_json = work / f"eval-{method}.json"
        timing_json = work / f"eval-{method}.timing.json"
        if args.reuse and out_json.is_file() and (run_dir / "COMPLETED").is_file():
            results[method] = json.loads(out_json.read_text())["methods"]
            if timing_json.is_file():
                timings.update(json.loads(timing_json.read_text()))
            else:  # the training's own wall time; the evaluation's is not known
                wall = json.loads((run_dir / "COMPLETED").read_text()).get("wall_s")
                timings.update({f"{method}/train_s": wall, f"{method}/eval_s": None})
            continue
        if method == "coconut_cot" and not (work / "runs/cot/COMPLETED").is_file():
            raise SystemExit(
                f"coconut_cot starts from the cot run's weights: {work / 'runs/cot'} is not a "
                "finished run; run --methods cot first with the same --work"
            )
        t0 = time.monotonic()
        run(
            [
                *py, "train", str(CONFIG), f"data.path={data}", f"run.dir={run_dir}",
                f"run.name=latent-{method}", f"train.max_steps={args.max_steps}",
                "tracking.enabled=false", "checkpoint.interval=1000000", *batch,
                *args.set, *train_overrides, "--nproc", str(args.nproc),
            ],
            log,
        )  # fmt: skip
        timings[f"{method}/train_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        run(
            [
                *py, "eval", str(run_dir), "--task", "--data", str(data), "--no-mlflow",
                "--max-examples", "0", "--max-new-tokens", "48", "--json", str(out_json),
                "--out-dir", str(work / "plots" / method), *eval_flags,
            ],
            log,
        )  # fmt: skip
        timings[f"{method}/eval_s"] = round(time.monotonic() - t0, 1)
        timing_json.write_text(json.dumps({k: v for k, v in timings.items() if k.startswith(
            f"{method}/")}))  # fmt: skip
        results[method] = json.loads(out_json.read_text())["methods"]

    device = "cpu"
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"latent-reasoning-{device}-{'quick-' if args.quick else ''}{stamp}"
    record = {
        "bench": "latent_reasoning",
        "quick": args.quick,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"host_cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "python": platform.python_version()},
        "settings": {"max_steps": args.max_steps, "steps": [lo, hi],
                     "train_examples": args.train_examples,
                     "test_examples": args.test_examples, "nproc": args.nproc,
                     "overrides": args.set,
                     "methods": {m: plans[m][0] for m in methods}},
        "timings_s": timings,
        "results": results,
    }  # fmt: skip
    table = markdown_table(results, lo, hi)
    record["table"] = table
    from pipeline.common.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(base.with_suffix(".json"), record)
    atomic_write_text(base.with_suffix(".md"), table + "\n")
    plot(results, base.with_suffix(".png"))
    print(table)
    print(f"\n{base}.json / .md / .png  (work folder {work})")
    return 0


def curves(results: dict) -> dict[str, list[dict]]:
    """One curve per trained model and evaluated knob family: recurrent/depth, pause/pause, ..."""
    out = {}
    for method, per in results.items():
        for kind, pts in per.items():
            if method == "pause" and kind == "depth":
                continue  # the same points as pause 0
            out[method if len(per) == 1 or kind != "depth" else f"{method}/{kind}"] = pts
    return out


def markdown_table(results: dict, lo: int, hi: int) -> str:
    rows = ["| method | knob | accuracy | " + " | ".join(f"d={d}" for d in range(lo, hi + 1))
            + " | GFLOP/answer | vs r1 |",
            "| --- | ---: | ---: | " + " | ".join("---:" for _ in range(lo, hi + 1))
            + " | ---: | ---: |"]  # fmt: skip
    base = None
    if "r1" in results:
        base = results["r1"]["depth"][0]["accuracy"]
    for name, pts in curves(results).items():
        for pt in pts:
            by = [pt["by_difficulty"].get(str(d)) for d in range(lo, hi + 1)]
            ratio = f"{pt['accuracy'] / base:.2f}x" if base else "-"
            rows.append(
                f"| {name} | {pt['knob']} | {pt['accuracy']:.3f} | "
                + " | ".join("-" if v is None else f"{v:.3f}" for v in by)
                + f" | {pt['flops_per_answer'] / 1e9:.4f} | {ratio} |"
            )
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.common.atomic import atomic_open

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, pts in curves(results).items():
        ax.plot([p["flops_per_answer"] for p in pts], [p["accuracy"] for p in pts], marker="o",
                label=name)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("forward FLOPs per answer")
    ax.set_ylabel("exact-match accuracy (test)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
