"""`rdpt`: the single command-line entry point.

Each subcommand lives in its own module, which exposes `register(subparsers)` and keeps its
heavy imports (torch, megatron, deepspeed, mlflow) inside the handler so `rdpt --help` is
instant. COMMAND_MODULES is the dispatch table: one line per module.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline import __version__
from pipeline.common.errors import RdptError

COMMAND_MODULES: list[str] = [  # in the order a user meets them
    "pipeline.cli.prep",  # rdpt prep, prep verify, prep inspect
    "pipeline.cli.model",  # rdpt model-info, rdpt convert
    "pipeline.cli.train",  # rdpt train, rdpt export
    "pipeline.cli.eval",  # rdpt eval, rdpt generate
    "pipeline.cli.runs",  # rdpt mlflow-server start|stop|status, rdpt runs list|compare
    "pipeline.cli.submit",  # rdpt submit train|prep, rdpt jobs [cancel]
]

EPILOG = """\
typical session:
  rdpt prep --input corpus/ --output data/corpus --vocab-size 32768 --seq-len 2048
  rdpt train configs/train/tiny.yaml data.path=data/corpus run.name=first
  rdpt eval runs/first --recurrences 1,4,16,32
  rdpt runs compare first second

run `rdpt COMMAND --help` for each command's options and an example."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rdpt",
        description="Pretrain recurrent-depth language models: prepare data, train, "
        "evaluate, launch on Slurm, compare runs in MLflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rdpt {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except RdptError as e:
        if not getattr(e, "reported", False):  # a training rank said it already
            print(f"rdpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rdpt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
