"""`rdpt eval` (loss against depth, adaptive exit, telemetry, lm-eval tasks) and `rdpt generate`.

Heavy imports (torch, mlflow, lm_eval) happen inside the handlers so `rdpt --help` stays instant.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from pipeline.common.errors import RdptConfigError, RdptDataError

DEFAULT_RECURRENCES = "1,2,4,8,16,32,64"
DEFAULT_MAX_SEQUENCES = 256

EVAL_EPILOG = """\
examples:
  rdpt eval runs/tiny                                   # validation loss at r = 1,2,...,64
  rdpt eval runs/tiny/checkpoints/step-00000200 --recurrences 1,4,16 --state-init zero
  rdpt eval runs/tiny --tokens batch.npy --json out/eval-batch.json --no-mlflow
  rdpt eval runs/tiny --adaptive --exit-criterion kl --threshold 5e-4 --max-r 64
  rdpt eval runs/tiny-gate --adaptive --exit-criterion gate --threshold 0.5 --exit-curve
  rdpt eval runs/tiny --lm-eval-tasks my_task --lm-eval-include tasks/ --recurrences 32
  rdpt eval runs/tiny --nproc 2                         # split sequences over 2 processes

CKPT_OR_RUN is a run directory (its latest checkpoint), a checkpoint directory, or an MLflow
run id (with --tracking-uri / MLFLOW_TRACKING_URI). Results: a table on stdout, a JSON file
(default <run_dir>/eval-step<N>.json), PNG plots in <run_dir>/eval/, and metrics eval/loss_r
and eval/ppl_r (step = r) plus the plots in the run's MLflow run."""

GENERATE_EPILOG = """\
examples:
  rdpt generate runs/tiny --prompt "def main(" --max-new-tokens 64 --recurrences 32
  rdpt generate runs/tiny --prompt "import os" --temperature 0.8 --top-p 0.95 --seed 3
  rdpt generate runs/tiny --prompt "class A" --adaptive --threshold 5e-4 --max-r 64 \\
      --kv-budget 4 --continuous-cot
  rdpt generate runs/tiny --prompt "def f(" --recurrences 32 --speculate 4:3 --json out.json

Prints the text, then tokens/s and the mean number of iterations per token."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_recurrences(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; raises RdptConfigError naming the bad value (r <= 0, not int)."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            r = int(part)
        except ValueError:
            raise RdptConfigError(f"--recurrences: {part!r} is not an integer") from None
        if r <= 0:
            raise RdptConfigError(f"--recurrences: r must be >= 1, got {r}")
        out.append(r)
    if not out:
        raise RdptConfigError("--recurrences: give at least one r, e.g. 1,4,16")
    return sorted(set(out))


def _add_depth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-init",
        choices=["random", "zero"],
        default=None,
        help="initial latent state (eval default: random; generate default: zero)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random initial state")
    p.add_argument("--adaptive", action="store_true", help="per-token adaptive exit")
    p.add_argument(
        "--exit-criterion",
        choices=["kl", "entropy", "state", "gate"],
        default="kl",
        help="kl: KL of successive next-token distributions; entropy: of the "
        "prediction; state: relative state change; gate: the learned exit gate's probability "
        "of continuing (model.exit_gate, train.stage=exit_gate) (default kl)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=5e-4,
        help="exit when the criterion falls below this (default 5e-4)",
    )
    p.add_argument(
        "--max-r",
        type=_positive_int,
        default=64,
        help="maximum iterations with --adaptive (default 64)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow URI (default: the run's mlflow_run.json, then MLFLOW_TRACKING_URI)",
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="loss against recurrence depth, adaptive exit, lm-eval tasks",
        description="Evaluate a checkpoint at several recurrence counts r (loss, perplexity, "
        "telemetry), optionally with per-token adaptive exit and lm-evaluation-harness tasks.",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="CKPT_OR_RUN")
    p.add_argument(
        "--recurrences",
        default=None,
        help=f"comma-separated r values (default {DEFAULT_RECURRENCES} and the r-bar the model "
        "was trained with)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--data", default=None, help="an `rdpt prep` dataset (default: the run's own dataset)"
    )
    src.add_argument(
        "--tokens",
        default=None,
        help="a [batch, seq] integer .npy array; next-token loss within each row",
    )
    p.add_argument("--split", default=None, help="dataset split (default val; test with --task)")
    p.add_argument(
        "--max-sequences",
        type=int,
        default=DEFAULT_MAX_SEQUENCES,
        help=f"evaluate the first N sequences (default {DEFAULT_MAX_SEQUENCES}; 0 = all)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument(
        "--no-telemetry",
        action="store_true",
        help="skip per-iteration telemetry (state change, cosine, loss per iteration)",
    )
    p.add_argument(
        "--telemetry-sequences",
        type=_positive_int,
        default=64,
        help="sequences for the per-iteration telemetry (default 64: it decodes "
        "after every iteration)",
    )
    p.add_argument(
        "--json", default=None, help="results file (default <run_dir>/eval-step<N>.json)"
    )
    p.add_argument("--out-dir", default=None, help="plot folder (default <run_dir>/eval)")
    p.add_argument("--lm-eval-tasks", default=None, help="comma-separated lm-eval task names")
    p.add_argument(
        "--lm-eval-include", default=None, help="folder of lm-eval task YAML files (local data)"
    )
    p.add_argument(
        "--lm-eval-limit", type=float, default=None, help="at most N examples per lm-eval task"
    )
    p.add_argument(
        "--lm-eval-r",
        type=_positive_int,
        default=None,
        help="r for lm-eval tasks (default: the largest --recurrences when given, else the "
        "training r-bar; --max-r with --adaptive)",
    )
    p.add_argument(
        "--exit-curve",
        action="store_true",
        help="with --adaptive: loss against mean depth for the kl, entropy and state criteria, "
        "one point per threshold, with the compute saved at equal loss",
    )
    p.add_argument(
        "--depth-categories",
        metavar="FILE.jsonl",
        default=None,
        help="with --adaptive: exit-depth histogram per category of a JSON Lines file of "
        "texts ({'text': ..., 'category': ...}), with and without continuous CoT",
    )
    p.add_argument("--text-field", default="text", help="text field of --depth-categories")
    p.add_argument(
        "--category-field", default="category", help="category field of --depth-categories"
    )
    p.add_argument(
        "--category-max-tokens",
        type=_positive_int,
        default=256,
        help="read at most this many tokens of each --depth-categories text (default 256)",
    )
    p.add_argument(
        "--nproc",
        type=_positive_int,
        default=1,
        help="processes (data-parallel ranks) on this machine (default 1)",
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    t = p.add_argument_group("reasoning tasks (--task)")
    t.add_argument(
        "--task",
        action="store_true",
        help="exact-match accuracy on a task dataset (rdpt prep --task) against r, pause "
        "count, thought count and adaptive exit, by difficulty",
    )
    t.add_argument("--pause", default=None, help="pause counts, comma-separated (e.g. 0,4,8)")
    t.add_argument("--thoughts", default=None, help="continuous-thought counts (e.g. 0,2,4)")
    t.add_argument(
        "--task-r",
        type=_positive_int,
        default=None,
        help="r of the pause and thought points (default: the training r-bar)",
    )
    t.add_argument(
        "--feedback",
        choices=["coda", "core"],
        default=None,
        help="state fed back as a thought (default: the run's coconut.feedback)",
    )
    t.add_argument(
        "--max-examples",
        type=int,
        default=200,
        help="examples of the split (default 200; 0 = all)",
    )
    t.add_argument("--max-new-tokens", type=_positive_int, default=64)
    _add_depth_args(p)
    p.set_defaults(func=eval_handler)

    g = subparsers.add_parser(
        "generate",
        help="sample text at a fixed or adaptive depth",
        description="Generate text from a checkpoint with a KV cache: greedy / temperature / "
        "top-p sampling, fixed r or adaptive exit per token, Huginn KV-cache sharing and "
        "continuous chain of thought.",
        epilog=GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("target", metavar="CKPT_OR_RUN")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument(
        "--recurrences",
        "-r",
        type=_positive_int,
        default=None,
        help="iterations per token (default: the r-bar the model was trained with, 32 if unknown)",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument(
        "--kv-budget",
        type=_positive_int,
        default=None,
        help="KV-cache slots per core layer (iteration i writes slot i mod k); "
        "default one per iteration",
    )
    g.add_argument(
        "--continuous-cot",
        action="store_true",
        help="warm-start each position's state from the previous final state",
    )
    g.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch.compile of a core iteration and, for fixed r, a CUDA graph of the decode "
        "step (auto: on with CUDA; on: also on CPU, after a one-off compile)",
    )
    g.add_argument(
        "--speculate",
        metavar="DRAFT_R:N",
        default=None,
        help="self-speculative greedy decoding: draft N tokens with DRAFT_R iterations, verify "
        "them at the full r in one pass (the output equals plain greedy; plain greedy also runs "
        "once to measure the speedup)",
    )
    g.add_argument(
        "--pause",
        type=int,
        default=0,
        metavar="N",
        help="append N <|pause|> tokens to the prompt (a model fine-tuned with data.pause)",
    )
    g.add_argument("--json", default=None, help="write the result (ids, depths, timing) here")
    _add_depth_args(g)
    g.set_defaults(func=generate_handler)


# ---------------------------------------------------------------------------------- eval
def _check_eval_args(args) -> list[int]:
    rs = parse_recurrences(args.recurrences or DEFAULT_RECURRENCES)
    if args.threshold < 0 or not math.isfinite(args.threshold):
        raise RdptConfigError(f"--threshold: must be a finite number >= 0, got {args.threshold}")
    if args.tokens and not Path(args.tokens).is_file():
        raise RdptDataError(f"--tokens: no such file {args.tokens}")
    if args.data and not (Path(args.data) / "manifest.json").is_file():
        raise RdptDataError(f"--data: {args.data} is not an `rdpt prep` dataset (no manifest.json)")
    if args.lm_eval_include and not Path(args.lm_eval_include).exists():
        raise RdptConfigError(f"--lm-eval-include: no such file or folder {args.lm_eval_include}")
    if args.max_sequences < 0:
        raise RdptConfigError(f"--max-sequences: must be >= 0 (0 = all), got {args.max_sequences}")
    if args.exit_curve and not args.adaptive:
        raise RdptConfigError("--exit-curve: exit curves need --adaptive")
    if args.depth_categories and not args.adaptive:
        raise RdptConfigError("--depth-categories: exit depths need --adaptive")
    if args.depth_categories and not Path(args.depth_categories).is_file():
        raise RdptDataError(f"--depth-categories: no such file {args.depth_categories}")
    # lm-eval scores one request at a time in padded batches: deterministic zeros unless asked
    args.lm_eval_state_init = args.state_init or "zero"
    if args.state_init is None:
        args.state_init = "random"
    return rs


def eval_handler(args) -> int:
    from pipeline.eval.loading import resolve_target

    args.split = args.split or ("test" if args.task else "val")
    if args.task:
        if args.tokens or args.lm_eval_tasks or args.nproc > 1:
            raise RdptConfigError("--task runs alone: without --tokens, --lm-eval-tasks, --nproc")
        args.target = str(resolve_target(args.target, args.tracking_uri))
        run_task_eval(args)
        return 0
    for flag in ("pause", "thoughts", "task_r", "feedback"):
        if getattr(args, flag) is not None:
            raise RdptConfigError(f"--{flag.replace('_', '-')} applies to --task only")
    _check_eval_args(args)
    args.target = str(resolve_target(args.target, args.tracking_uri))
    from pipeline.common.distributed import env_rank

    # NOTE: under torchrun / srun (WORLD_SIZE > 1) the ranks exist already: --nproc is ignored.
    if args.nproc > 1 and env_rank()[1] == 1:
        return _spawn(args)
    run_eval(args)
    return 0


def _spawn_worker(rank: int, args, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(args.nproc),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(args.nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    run_eval(args)


def _spawn(args) -> int:
    import torch.multiprocessing as mp

    from pipeline.common.distributed import free_port
    from pipeline.common.errors import RdptError

    try:
        mp.start_processes(
            _spawn_worker,
            args=(args, free_port()),
            nprocs=args.nproc,
            start_method="spawn",
            join=True,
        )
    except mp.ProcessRaisedException as e:
        last = str(e).strip().splitlines()[-1]
        raise RdptError(f"an evaluation process failed: {last}") from None
    return 0


def _device(name: str):
    import torch

    from pipeline.common.distributed import env_rank

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{env_rank()[2]}"
    return torch.device(name)


def load_token_batches(
    path: str,
    batch_size: int,
    rank: int,
    world: int,
    vocab_size: int,
    max_sequences: int | None = None,
) -> list:
    """(inputs, targets, sample_ids) batches of this rank's contiguous share of the rows of a
    [batch, seq] .npy token array."""
    import numpy as np
    import torch

    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise RdptDataError(f"--tokens: cannot read {path} as a .npy array: {e}") from None
    if arr.ndim != 2 or arr.shape[1] < 2 or not np.issubdtype(arr.dtype, np.integer):
        raise RdptDataError(
            f"--tokens: {path} must be a [batch, seq>=2] integer array, got "
            f"shape {arr.shape} dtype {arr.dtype}"
        )
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise RdptDataError(
            f"--tokens: {path} has ids outside [0, {vocab_size}) (min {arr.min()}, max {arr.max()})"
        )
    if max_sequences:
        arr = arr[:max_sequences]
    n = arr.shape[0]
    lo, hi = rank * n // world, (rank + 1) * n // world
    rows = torch.from_numpy(arr[lo:hi].astype(np.int64))
    ids = torch.arange(lo, hi, dtype=torch.long)
    return [
        (rows[i : i + batch_size, :-1], rows[i : i + batch_size, 1:], ids[i : i + batch_size])
        for i in range(0, rows.shape[0], batch_size)
    ]


def load_dataset_batches(
    path: str, split: str, batch_size: int, rank: int, world: int, max_sequences: int | None = None
) -> list:
    """This rank's share of a prepared dataset's `split` as (inputs, targets, sample_ids)
    batches; sample ids are global sequence indices, so a random initial state does not depend
    on the number of processes."""
    from pipeline.data.loader import iterate_sequences, open_dataset

    info = open_dataset(path)
    if split not in info.manifest.get("splits", {}):
        raise RdptDataError(
            f"--split: dataset {path} has no split {split!r} "
            f"(has {sorted(info.manifest.get('splits', {}))})"
        )
    return [
        tuple(mb)
        for mb in iterate_sequences(
            path,
            split=split,
            batch_size=batch_size,
            dp_rank=rank,
            dp_size=world,
            max_sequences=max_sequences,
        )
    ]


def run_eval(args) -> dict | None:
    """The evaluation itself (one rank); rank 0 writes JSON / plots / MLflow and returns the
    results dict, other ranks return None."""
    import torch

    from pipeline.common.distributed import env_rank, init_process_group
    from pipeline.eval.adaptive import ExitRule, check_rule, evaluate_adaptive
    from pipeline.eval.depth import sweep_depths
    from pipeline.eval.loading import default_r, load_model_and_tokenizer

    rank, world, _ = env_rank()
    if world > 1:
        init_process_group()
    t0 = time.monotonic()
    device = _device(args.device)
    loaded = load_model_and_tokenizer(args.target, args.tracking_uri, device=str(device))
    rs = parse_recurrences(args.recurrences or DEFAULT_RECURRENCES)
    if args.recurrences is None:  # the training r-bar belongs to the default sweep
        rs = sorted(set(rs) | {default_r(loaded)})
    model = loaded.model
    vocab = int(loaded.cfg.model.vocab_size)
    if args.tokens:
        source = {"tokens": str(Path(args.tokens).resolve())}
        batches = load_token_batches(
            args.tokens, args.batch_size, rank, world, vocab, args.max_sequences or None
        )
    else:
        data = args.data or (str(loaded.data_path) if loaded.data_path else None)
        if not data or not (Path(data) / "manifest.json").is_file():
            raise RdptDataError(
                f"the run's dataset {loaded.cfg.data.path!r} is not on this machine; "
                "pass --data DIR or --tokens FILE.npy"
            )
        source = {"data": str(Path(data).resolve()), "split": args.split}
        batches = load_dataset_batches(
            data, args.split, args.batch_size, rank, world, args.max_sequences or None
        )
    rule = ExitRule(args.exit_criterion, args.threshold) if args.adaptive else None
    check_rule(loaded.model, rule)  # before any work: a gate needs a model with one
    telemetry = not args.no_telemetry
    progress = rank == 0 and sys.stderr.isatty()
    # Adaptive exit is compared against the fixed-r loss at every r up to max_r on the same data,
    # so then the main sweep decodes after every iteration (and records telemetry on the way);
    # otherwise it decodes only at the requested r and telemetry runs on a small subset.
    sweep_rs = sorted(set(rs) | ({args.max_r} if rule else set()))
    sweep = sweep_depths(
        model,
        batches,
        sweep_rs,
        args.state_init,
        args.seed,
        telemetry=telemetry and rule is not None,
        loss_every_iteration=rule is not None,
        progress=progress,
    )
    tel = sweep.telemetry if rule is not None else {}
    if telemetry and rule is None:
        tel_batches, n = [], 0
        for b in batches:
            if n >= max(1, args.telemetry_sequences // world):
                break
            tel_batches.append(b)
            n += b[0].shape[0]
        tel = sweep_depths(
            model,
            tel_batches,
            [rs[-1]],
            args.state_init,
            args.seed,
            telemetry=True,
            loss_every_iteration=True,
        ).telemetry
    results = {
        "target": args.target,
        "run_dir": str(loaded.run_dir) if loaded.run_dir else None,
        "step": loaded.meta.get("step"),
        "source": source,
        "world_size": world,
        **sweep.to_dict(),
        "telemetry": tel,
    }
    results["recurrences"] = rs
    results["depth"] = {str(r): results["depth"][str(r)] for r in rs}
    if rule is not None:
        adaptive = evaluate_adaptive(
            model,
            batches,
            rule=rule,
            max_r=args.max_r,
            state_init=args.state_init,
            seed=args.seed,
            fixed_curve=sweep.telemetry["loss"][: args.max_r],
            progress=progress,
        )
        results["adaptive"] = adaptive.to_dict()
        if args.exit_curve:
            from pipeline.eval.adaptive import exit_curves

            results["adaptive_curve"] = exit_curves(
                model,
                batches,
                max_r=args.max_r,
                fixed_curve=sweep.telemetry["loss"][: args.max_r],
                state_init=args.state_init,
                seed=args.seed,
            )
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    # NOTE: after the barrier: lm-eval runs on rank 0 alone and may outlast a collective timeout.
    if args.lm_eval_tasks:
        results["lm_eval"] = _run_lm_eval(args, loaded, rs, rule)
    if args.depth_categories:
        results["adaptive_by_category"] = _depths_by_category(args, loaded, rule)
    results["seconds"] = time.monotonic() - t0
    from pipeline.eval.report import print_table, write_outputs

    print_table(results)
    write_outputs(results, args, loaded)
    return results


def parse_counts(text: str | None, flag: str) -> list[int]:
    if not text:
        return []
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RdptConfigError(f"{flag}: comma-separated integers, got {text!r}") from None
    if any(c < 0 for c in counts):
        raise RdptConfigError(f"{flag}: every count must be >= 0, got {text!r}")
    return sorted(set(counts))


def run_task_eval(args) -> dict:
    """`rdpt eval --task`: pipeline/eval/task_eval.py on the split, then table, JSON, PNGs
    and MLflow (task/<method>/accuracy with step = r, pause or thought count)."""
    from pipeline.data.loader import open_dataset
    from pipeline.data.task_loader import check_task_dataset, task_examples
    from pipeline.eval.adaptive import ExitRule, check_rule
    from pipeline.eval.loading import default_r, load_model_and_tokenizer
    from pipeline.eval.report import publish
    from pipeline.eval.task_eval import (
        TaskEvalPlan,
        evaluate_task,
        plot_task,
        print_task_table,
        task_metrics,
    )

    t0 = time.monotonic()
    pauses = parse_counts(args.pause, "--pause")
    thoughts = parse_counts(args.thoughts, "--thoughts")
    if args.max_examples < 0:
        raise RdptConfigError(f"--max-examples: must be >= 0, got {args.max_examples}")
    loaded = load_model_and_tokenizer(
        args.target, args.tracking_uri, device=str(_device(args.device))
    )
    data = args.data or (str(loaded.data_path) if loaded.data_path else None)
    if not data:
        raise RdptDataError("--task: the run's dataset is not on this machine; pass --data DIR")
    info = open_dataset(data)
    manifest = check_task_dataset(info, "--task")
    rs = parse_recurrences(args.recurrences or DEFAULT_RECURRENCES)
    rule = ExitRule(args.exit_criterion, args.threshold) if args.adaptive else None
    check_rule(loaded.model, rule)  # before any work: a gate needs a model with one
    plan = TaskEvalPlan(
        recurrences=rs,
        pauses=pauses,
        thoughts=thoughts,
        r=args.task_r or default_r(loaded),
        exit_rule=rule,
        max_r=args.max_r,
        feedback=args.feedback or loaded.cfg.coconut.feedback,
        max_new_tokens=args.max_new_tokens,
        state_init=args.state_init or "zero",
        seed=args.seed,
    )
    ids = dict(manifest["special_ids"])
    examples = list(task_examples(data, args.split, args.max_examples or None))
    results = {
        "task": manifest["task"]["name"],
        "target": args.target,
        "run_dir": str(loaded.run_dir) if loaded.run_dir else None,
        "step": loaded.meta.get("step"),
        "data": str(Path(data).resolve()),
        "split": args.split,
        "plan": {
            "recurrences": rs,
            "pauses": pauses,
            "thoughts": thoughts,
            "r": plan.r,
            "adaptive": None
            if rule is None
            else {"criterion": rule.criterion, "threshold": rule.threshold, "max_r": plan.max_r},
            "feedback": plan.feedback,
            "state_init": plan.state_init,
        },
        **evaluate_task(loaded.model, examples, plan, ids, loaded.cfg.model),
    }
    results["seconds"] = time.monotonic() - t0
    print_task_table(results)
    ckpt = Path(loaded.meta.get("checkpoint") or args.target)
    base = loaded.run_dir or ckpt.resolve().parent
    step = results["step"]
    json_path = Path(args.json) if args.json else base / f"task-eval-step{step}.json"
    out_dir = Path(args.out_dir) if args.out_dir else base / "eval"
    pngs = plot_task(results, out_dir)
    publish(results, json_path, pngs, loaded, args, task_metrics)  # step = the method's knob
    print(f"\nresults: {json_path}\nplots:   {out_dir}")
    return results


def _run_lm_eval(args, loaded, rs: list[int], rule) -> dict:
    from pipeline.eval.lm_eval_adapter import RdptLM, run_lm_eval
    from pipeline.eval.loading import default_r

    if loaded.tokenizer is None:
        raise RdptDataError(f"lm-eval needs the tokenizer; {loaded.tokenizer_path} is missing")
    r = args.lm_eval_r or (
        args.max_r if rule else rs[-1] if args.recurrences else default_r(loaded)
    )
    lm = RdptLM(
        loaded.model,
        loaded.tokenizer,
        eot_id=loaded.eot_id,
        max_length=loaded.max_length,
        r=r,
        exit_rule=rule,
        state_init=args.lm_eval_state_init,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    tasks = [t.strip() for t in args.lm_eval_tasks.split(",") if t.strip()]
    limit = args.lm_eval_limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    scores = run_lm_eval(lm, tasks, include_path=args.lm_eval_include, limit=limit)
    return {
        "r": r,
        "adaptive": rule is not None,
        "state_init": args.lm_eval_state_init,
        "mean_depth": lm.mean_depth,
        "tasks": scores,
    }


def _depths_by_category(args, loaded, rule) -> dict:
    from pipeline.eval.depth_by_category import depths_by_category, read_category_jsonl

    if loaded.tokenizer is None:
        raise RdptDataError(
            f"--depth-categories needs the tokenizer; {loaded.tokenizer_path} is missing"
        )
    texts = read_category_jsonl(args.depth_categories, args.text_field, args.category_field)
    tok = loaded.tokenizer
    return {
        "file": str(Path(args.depth_categories).resolve()),
        "criterion": rule.criterion,
        "threshold": rule.threshold,
        "max_r": args.max_r,
        "categories": depths_by_category(
            loaded.model,
            lambda text: tok.encode(text, add_special_tokens=False).ids,
            texts,
            rule,
            args.max_r,
            max_tokens=min(args.category_max_tokens, loaded.max_length),
            state_init=args.state_init,
            seed=args.seed,
        ),
    }


# ---------------------------------------------------------------------------------- generate
def pause_count(n: int) -> int:
    if n < 0:
        raise RdptConfigError(f"--pause: the number of pause tokens must be >= 0, got {n}")
    return n


def pause_id(tok) -> int:
    """The id of `<|pause|>` in `tok` (an error when the tokenizer has none)."""
    i = tok.token_to_id("<|pause|>")
    if i is None:
        raise RdptDataError("--pause: the model's tokenizer has no <|pause|> token")
    return int(i)


def generate_handler(args) -> int:
    from pipeline.eval.adaptive import ExitRule, check_rule
    from pipeline.eval.generate import GenerationConfig, generate
    from pipeline.eval.loading import default_r, load_model_and_tokenizer

    if args.threshold < 0:
        raise RdptConfigError(f"--threshold: must be >= 0, got {args.threshold}")
    if args.temperature < 0:
        raise RdptConfigError(f"--temperature: must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise RdptConfigError(f"--top-p: must be in (0, 1], got {args.top_p}")
    loaded = load_model_and_tokenizer(
        args.target, args.tracking_uri, device=str(_device(args.device))
    )
    if loaded.tokenizer is None:
        raise RdptDataError(f"generate needs the tokenizer; {loaded.tokenizer_path} is missing")
    tok = loaded.tokenizer
    prompt = tok.encode(args.prompt, add_special_tokens=False).ids or [loaded.eot_id]
    prompt = prompt + [pause_id(tok)] * pause_count(args.pause)
    room = loaded.max_length - len(prompt)
    if room <= 0:
        raise RdptConfigError(
            f"--prompt: {len(prompt)} tokens leave no room in the model's "
            f"context of {loaded.max_length}"
        )
    rule = ExitRule(args.exit_criterion, args.threshold) if args.adaptive else None
    check_rule(loaded.model, rule)  # before any work: a gate needs a model with one
    cfg = GenerationConfig(
        max_new_tokens=min(args.max_new_tokens, room),
        r=args.max_r if rule else (args.recurrences or default_r(loaded)),
        exit_rule=rule,
        kv_budget=args.kv_budget,
        continuous_cot=args.continuous_cot,
        temperature=args.temperature,
        top_p=args.top_p,
        state_init=args.state_init or "zero",
        seed=args.seed,
        stop_ids=[loaded.eot_id],
        compile={"auto": None, "on": True, "off": False}[args.compile],
        cuda_graph=False if args.compile == "off" else None,
    )
    speculation = None
    if args.speculate:
        speculation = _speculate(args.speculate, loaded.model, prompt, cfg)
    result = generate(loaded.model, prompt, cfg)
    if speculation is not None:
        ids, spec_out = speculation
        spec_out["plain_tokens_per_s"] = result.tokens_per_s
        spec_out["speedup"] = spec_out["tokens_per_s"] / max(result.tokens_per_s, 1e-12)
        spec_out["identical_to_plain"] = ids == result.new_ids
        if ids != result.new_ids:  # never expected: the verification pass makes them equal
            print("warning: speculative output differs from plain greedy", file=sys.stderr)
        print(
            f"[speculative {args.speculate}: acceptance {spec_out['acceptance_rate']:.2f}, "
            f"{spec_out['tokens_per_s']:.1f} tokens/s, {spec_out['speedup']:.2f}x plain greedy]",
            file=sys.stderr,
        )
    print(args.prompt + tok.decode(result.new_ids, skip_special_tokens=False))
    print(
        f"\n[{len(result.new_ids)} tokens, {result.tokens_per_s:.1f} tokens/s, "
        f"mean depth {result.mean_depth:.1f} iterations/token, prefill "
        f"{result.prefill_seconds:.2f} s, decode path {result.decode_path}]",
        file=sys.stderr,
    )
    if args.json:
        from pipeline.common.atomic import atomic_write_json

        out = {
            "prompt": args.prompt,
            "text": tok.decode(result.new_ids),
            **result.to_dict(),
            "config": {
                "r": cfg.r,
                "adaptive": rule is not None,
                "criterion": args.exit_criterion if rule else None,
                "threshold": args.threshold if rule else None,
                "kv_budget": args.kv_budget,
                "continuous_cot": args.continuous_cot,
                "temperature": args.temperature,
                "top_p": args.top_p,
                "compile": args.compile,
                "pause": args.pause,
            },
        }
        if speculation is not None:
            out["speculation"] = speculation[1]
        atomic_write_json(Path(args.json), out)
    return 0


def _speculate(text: str, model, prompt: list[int], cfg) -> tuple[list[int], dict]:
    """Run `--speculate DRAFT_R:N`; returns (its token ids, its JSON record)."""
    from pipeline.eval.speculative import Speculation, generate_speculative

    try:
        spec = Speculation.parse(text)
        spec.check(cfg)
    except ValueError as e:
        raise RdptConfigError(str(e)) from None
    res = generate_speculative(model, prompt, cfg, spec)
    return res.new_ids, {
        **res.stats.to_dict(len(res.new_ids)),
        "tokens_per_s": res.tokens_per_s,
        "seconds": res.seconds,
    }
