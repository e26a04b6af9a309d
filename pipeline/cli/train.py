"""`rdpt train` and `rdpt export`: command-line entry points of the training area."""

from __future__ import annotations

import argparse
import json
import os

TRAIN_EPILOG = """\
examples:
  rdpt train configs/train/tiny.yaml data.path=data/corpus run.name=first --nproc 2
  rdpt train configs/train/tiny.yaml optim.lr=3e-4 train.max_steps=200 run.name=lr3e-4
  rdpt train runs/first/resolved.yaml --resume auto        # continue an interrupted run
  rdpt train configs/train/huginn.yaml parallel.zero_stage=3 --dry-run
  rdpt train configs/train/huginn-0125.yaml --dry-run --nodes 512 --gpus-per-node 8 --gpu-mem 80

--resume: auto = newest complete checkpoint of the run dir that verifies (falls back past
corrupted ones), none = start from scratch, or a checkpoint directory.
Exit codes: 0 done, 2 bad config/input, 85 stopped on SIGUSR1/SIGTERM after a checkpoint
(requeue), 86 stopped after train.max_nonfinite_steps non-finite steps in a row.
Under Slurm (srun) or torchrun, ranks come from the environment and --nproc is ignored."""

EXPORT_EPILOG = """\
examples:
  rdpt export runs/first exports/first                     # newest good checkpoint
  rdpt export runs/first/checkpoints/step-00000200 out/ --format hf"""


def register(subparsers) -> None:
    from pipeline.common.cli_args import OverridesParser

    # NOTE: overrides are accepted after options too (`CONFIG --nproc 2 optim.lr=1e-3`); the
    # dispatch table's subparsers action builds plain parsers, so swap the class for this one.
    default_class = subparsers._parser_class
    subparsers._parser_class = OverridesParser
    try:
        _register_train(subparsers)
    finally:
        subparsers._parser_class = default_class
    _register_export(subparsers)


def _register_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a recurrent-depth model (DeepSpeed ZeRO, MLflow)",
        description="Pretrain a recurrent-depth LM on a prepared dataset with DeepSpeed ZeRO; "
        "every run is resumable and tracked in MLflow.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="train YAML (configs/train/*.yaml or a run's resolved.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="local processes (default parallel.nproc from the config)",
    )
    p.add_argument("--resume", default="auto", help="auto | none | PATH (default auto)")
    p.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="KEY",
        help="continue a run whose config differs in KEY (or a section, e.g. optim.); "
        "repeatable; without it such a continuation is refused, saying what would change",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, print the resolved config, the DeepSpeed config and the per-GPU "
        "memory estimate, exit (2 when the layout cannot fit --gpu-mem)",
    )
    p.add_argument("--nodes", type=int, default=None, help="--dry-run: nodes of the layout")
    p.add_argument(
        "--gpus-per-node", type=int, default=None, help="--dry-run: GPUs per node (default 8)"
    )
    p.add_argument(
        "--gpu-mem",
        type=float,
        default=80,
        help="--dry-run: memory of one GPU in GB (80 = H100/A100, 141 = H200; default 80)",
    )
    p.set_defaults(func=train_handler)


def _register_export(subparsers) -> None:
    e = subparsers.add_parser(
        "export",
        help="export a checkpoint to safetensors or the HF Huginn layout",
        description="Consolidate a training checkpoint (ZeRO 0-3) into full weights.",
        epilog=EXPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("checkpoint", help="run directory or checkpoint directory")
    e.add_argument("output", help="output directory")
    e.add_argument("--format", choices=["safetensors", "hf"], default="safetensors")
    e.set_defaults(func=export_handler)


def train_handler(args) -> int:
    import signal

    from pipeline.common.stop_signals import record_early_signals

    # NOTE: first thing, before the heavy imports: a SIGUSR1/SIGTERM from Slurm during start-up
    # must lead to a checkpoint and exit 85, not kill the process (see pipeline.train).
    early, previous = record_early_signals()
    try:
        return _train(args, early, previous)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _train(args, early: list[int], previous: dict) -> int:
    """Parse and resolve the config once, then run `pipeline.train.main` on every rank: in this
    process (under srun/torchrun, or one process) or in --nproc workers started here."""

    from pipeline.common.distributed import launched_externally
    from pipeline.common.errors import RdptConfigError
    from pipeline.common.run_lock import RunLock
    from pipeline.training.checkpoint import completed_step
    from pipeline.training.config import load_train_config
    from pipeline.training.resolve import resolve

    cfg = load_train_config(args.config, args.overrides)
    if args.dry_run:
        return _dry_run(cfg, args)
    external = launched_externally()
    if external:
        world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS", "1"))
    else:
        world = args.nproc or cfg.parallel.nproc
        if world < 1:
            raise RdptConfigError(f"--nproc must be >= 1, got {world}")
    cfg, dims = resolve(cfg, world)
    run_dir = cfg.run_dir()
    done = completed_step(run_dir) if args.resume == "auto" else None
    if done is not None and done >= cfg.train.max_steps:
        print(
            f"rdpt train: {run_dir} is already complete (checkpoint at step {done} >= "
            f"train.max_steps={cfg.train.max_steps}); nothing to do"
        )
        return 0
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    lock = RunLock(run_dir)
    if rank == 0 and not external:  # this process (launcher or only rank) holds the run
        lock.acquire()
    try:
        return _run(args, cfg, run_dir, rank, external, world, early, previous)
    finally:
        lock.release()


def _run(args, cfg, run_dir, rank: int, external: bool, world: int, early, previous) -> int:
    import signal

    from pipeline.common.config_io import save_resolved

    if rank == 0:
        if args.resume != "none":
            check_run_continuation(run_dir, cfg, args.allow_change)
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir / "resolved.yaml")
    from pipeline.train import main

    if external or world == 1:
        return main(cfg, resume=args.resume, early_signals=early)
    for sig, handler in previous.items():  # the elastic agent forwards signals to the workers
        signal.signal(sig, handler)
    if early:
        print("rdpt train: stop signal received before the workers started; not starting them")
        from pipeline.common.exitcodes import REQUEUE

        return REQUEUE
    from launch.local import launch_local

    return launch_local(main, (cfg, args.resume), nproc=world, run_dir=run_dir)


def check_run_continuation(run_dir, cfg, allow) -> None:
    """A run with a checkpoint continues only with a config it can continue exactly (see
    training/config_change.py); RdptConfigError listing each difference otherwise."""
    import yaml

    from pipeline.common.errors import RdptConfigError
    from pipeline.training.checkpoint import completed_step
    from pipeline.training.config_change import check_continuation

    saved = run_dir / "resolved.yaml"
    if completed_step(run_dir) is None or not saved.is_file():
        return
    problems = check_continuation(
        yaml.safe_load(saved.read_text()), cfg.model_dump(mode="json"), allow
    )
    if problems:
        raise RdptConfigError(
            f"{run_dir} holds a run with a different config ({saved}); continuing it would "
            "change:\n  " + "\n  ".join(problems) + "\nor start a new run (run.name=...) or "
            "start over in this directory with --resume none"
        )


def _dry_run(cfg, args) -> int:
    """Resolve for the asked layout (--nodes x --gpus-per-node, else --nproc / parallel.nproc),
    print the config, the DeepSpeed config and the memory estimate; refuse what cannot fit.
    Without the dataset on this machine (planning a run), vocab and sequence length come from
    the model config."""
    from pipeline.common.config_io import to_yaml
    from pipeline.common.errors import RdptConfigError
    from pipeline.training.engine import deepspeed_config
    from pipeline.training.layout import ParallelDims
    from pipeline.training.memory import check_fits, estimate_memory, format_estimate
    from pipeline.training.resolve import resolve

    nodes = args.nodes
    if nodes is not None or args.gpus_per_node is not None:
        nodes = nodes or 1
        world = nodes * (args.gpus_per_node or 8)
    else:
        world = args.nproc or cfg.parallel.nproc
    if world < 1:
        raise RdptConfigError(f"the layout needs >= 1 GPU, got {world}")
    seq_len = cfg.model.max_seq_len
    try:
        cfg, dims = resolve(cfg, world)
        seq_len = int(read_seq_len(cfg) or seq_len)
    except RdptConfigError as e:
        if not str(e).startswith("data.path"):
            raise
        print(f"# {e}\n# (planning without the dataset: vocab and seq_len from model config)")
        cfg = cfg.model_copy(deep=True)
        cfg.parallel.nproc = world
        dims = ParallelDims.from_config(cfg, world)
    est = estimate_memory(cfg, dims, seq_len)
    print(to_yaml(cfg))
    # NOTE: YAML comments, so the part before "# DeepSpeed config" still parses as the config
    print(format_estimate(est, cfg, dims, args.gpu_mem, nodes=nodes))
    print("# DeepSpeed config")
    print(json.dumps(deepspeed_config(cfg, dims), indent=2))
    check_fits(est, cfg, dims, args.gpu_mem)
    return 0


def read_seq_len(cfg) -> int | None:
    from pipeline.training.resolve import read_manifest

    return read_manifest(cfg).get("seq_len")


def export_handler(args) -> int:
    from pipeline.training.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output, fmt=args.format)
    print(f"exported to {out}")
    return 0
