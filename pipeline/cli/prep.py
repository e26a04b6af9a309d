"""`rdpt prep`: prepare a dataset; `rdpt prep verify DIR`; `rdpt prep inspect DIR`."""

from __future__ import annotations

import argparse
import logging
import os
import time

from pipeline.common.errors import RdptConfigError

DESCRIPTION = """\
Prepare a pretraining dataset offline: read text (files, directories, globs, JSON Lines,
or the embedded corpus @stdlib) or token ids (Parquet, .npy), train a byte-level BPE (or load a
tokenizer.json), encode in parallel, pack documents (each between tokenizer.begin_token and
tokenizer.end_token, default <|endoftext|> after each) into rows of seq_len+1 tokens (one
stream, or packing=document: every row starts at a document) and write WebDataset tar shards
+ manifest.json. Output is byte-identical for any --workers; a killed run
resumes where it stopped; a finished dataset is not rebuilt.

forms:
  rdpt prep CONFIG [dotted.key=value ...]        from a YAML config (configs/data/*.yaml)
  rdpt prep --input PATH [PATH ...] --output DIR [options]
  rdpt prep verify DIR [--decode N]              re-check every shard against the manifest
  rdpt prep inspect DIR                          statistics: lengths, top tokens, bytes/token
  rdpt prep --task NAME --output DIR [key=value ...]   a reasoning task suite (arithmetic,
                                                 reachability): train/val/test from a seed

Slurm job arrays (or any set of machines sharing the output directory):
  rdpt prep CONFIG --task-index I --num-tasks M  encode the chunks c with c % M == I
  rdpt prep CONFIG --task-index env              I, M from SLURM_ARRAY_TASK_ID/_MIN/_COUNT
  rdpt prep CONFIG --finalize                    pack + manifest + verify, once all are done"""

EPILOG = """\
examples:
  rdpt prep configs/data/demo.yaml
  rdpt prep configs/data/demo.yaml output=data/stdlib tokenizer.vocab_size=32768 seq_len=1024
  rdpt prep --input corpus/ books.jsonl.zst --output data/corpus --vocab-size 32768 --workers 8
  rdpt prep --input '~/text/**/*.md' --output data/md --tokenizer data/corpus/tokenizer.json
  rdpt prep --input released/*.parquet --output data/huginn --tokenizer huginn/tokenizer.json \
      --seq-len 4096 tokenizer.begin_token='<|begin_text|>' tokenizer.end_token='<|end_text|>'
  rdpt prep verify data/corpus --decode 2
  rdpt prep inspect data/corpus
  rdpt prep --task arithmetic --output data/arith seed=0 sizes.train=20000 arithmetic.steps=[1,6]
  rdpt prep --task reachability --output data/reach reachability.hops=[2,6]
  rdpt prep configs/data/task-arithmetic.yaml      # a YAML with a top-level `task:` key"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prep",
        help="prepare a tokenised, packed WebDataset dataset (also: prep verify, prep inspect)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "config",
        nargs="?",
        metavar="CONFIG | verify | inspect",
        help="YAML config (configs/data/*.yaml), or the word verify / inspect",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value | DIR",
        help="dotted config overrides (e.g. seq_len=1024), or the dataset DIR "
        "after verify / inspect",
    )
    p.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="input files, directories, globs or @stdlib (sets `inputs`)",
    )
    p.add_argument("--output", metavar="DIR", help="dataset directory (sets `output`)")
    p.add_argument(
        "--task",
        metavar="NAME",
        help="generate a reasoning task suite instead of reading text (arithmetic, "
        "reachability; settings as key=value, see data_prep/task_prep.py)",
    )
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="tokenizer.json", help="use this tokenizer")
    tok.add_argument("--vocab-size", type=int, metavar="N", help="train a BPE of N tokens")
    p.add_argument("--seq-len", type=int, metavar="N", help="tokens per sequence (inputs)")
    p.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help="fraction of documents in the validation split (by content hash)",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="encode processes (default: all cores); the output does not depend on it",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a different dataset in the output directory",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="error on a non-UTF-8 or binary input instead of skipping it",
    )
    p.add_argument(
        "--task-index",
        metavar="I|env",
        help="encode only this task's chunks (Slurm array task; `env` reads "
        "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT)",
    )
    p.add_argument("--num-tasks", type=int, metavar="M", help="number of array tasks")
    p.add_argument(
        "--finalize",
        action="store_true",
        help="after all tasks: pack shards, write the manifest, verify",
    )
    p.add_argument(
        "--decode",
        type=int,
        default=0,
        metavar="N",
        help="(verify) print the first N training sequences decoded",
    )
    p.set_defaults(func=handler)


def _flag_overrides(args) -> list[str]:
    out = []
    if args.input:
        out.append("inputs=" + json_list(args.input))
    if args.output:
        out.append(f"output={json_str(args.output)}")
    if args.tokenizer:
        out.append(f"tokenizer.path={json_str(args.tokenizer)}")
    if args.vocab_size is not None:
        out.append(f"tokenizer.vocab_size={args.vocab_size}")
    if args.seq_len is not None:
        out.append(f"seq_len={args.seq_len}")
    if args.val_fraction is not None:
        out.append(f"val_fraction={args.val_fraction}")
    if args.workers is not None:
        out.append(f"workers={args.workers}")
    if args.overwrite:
        out.append("overwrite=true")
    if args.strict:
        out.append("strict=true")
    return out


def json_str(s: str) -> str:
    import json

    return json.dumps(s)  # a JSON string is a YAML string: quotes keep '@', ':' and '*' literal


def json_list(items: list[str]) -> str:
    import json

    return json.dumps(items)


def task_from_args(args) -> tuple[int, int] | None:
    """(index, count) of this array task, or None for a whole local run."""
    if args.task_index is None:
        if args.num_tasks is not None:
            raise RdptConfigError("--num-tasks needs --task-index")
        return None
    if args.task_index == "env":
        try:
            tid = int(os.environ["SLURM_ARRAY_TASK_ID"])
            first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            count = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        except (KeyError, ValueError):
            raise RdptConfigError(
                "--task-index env: SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT are not set "
                "(not inside a Slurm array job?)"
            ) from None
        index = tid - first
        if args.num_tasks is not None and args.num_tasks != count:
            raise RdptConfigError(
                f"--num-tasks {args.num_tasks} differs from SLURM_ARRAY_TASK_COUNT={count}"
            )
    else:
        try:
            index = int(args.task_index)
        except ValueError:
            raise RdptConfigError(
                f"--task-index {args.task_index!r}: expected an integer or `env`"
            ) from None
        if args.num_tasks is None:
            raise RdptConfigError("--task-index needs --num-tasks M")
        count = args.num_tasks
    if not 0 <= index < count:
        raise RdptConfigError(f"task index {index} outside [0, {count})")
    return index, count


def handler(args) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.config in ("verify", "inspect"):
        return _verify_or_inspect(args)
    from data_prep.config import PrepConfig
    from data_prep.prep import prepare
    from pipeline.common.config_io import load_config

    if args.task is not None or _is_task_config(args.config):
        return _prep_task(args)
    overrides = list(args.overrides) + _flag_overrides(args)
    if args.config is None and not args.input:
        raise RdptConfigError(
            "give a CONFIG file or --input PATH ... --output DIR (see rdpt prep --help)"
        )
    if args.config is not None and "=" in args.config:
        overrides.insert(0, args.config)  # flags form with a leading override
        args.config = None
    cfg = load_config(PrepConfig, args.config, overrides)
    task = task_from_args(args)
    if task is not None and args.finalize:
        raise RdptConfigError("--finalize and --task-index are separate steps")
    t0 = time.monotonic()
    manifest = prepare(cfg, task=task, finalize=args.finalize)
    if manifest is not None:
        print_summary(cfg.output, manifest, time.monotonic() - t0)
    return 0


def _is_task_config(path: str | None) -> bool:
    from pipeline.common.config_io import read_yaml

    if path is None or "=" in path or not path.endswith((".yaml", ".yml")):
        return False
    return "task" in read_yaml(path)


def _prep_task(args) -> int:
    """`rdpt prep --task NAME`: the reasoning task suite (data_prep/task_prep.py)."""
    from data_prep.task_prep import TaskPrepConfig, prepare_task
    from pipeline.common.config_io import load_config

    if args.input or args.tokenizer or args.vocab_size or args.task_index or args.finalize:
        raise RdptConfigError(
            "--task generates its examples and its word-level tokenizer: --input, --tokenizer, "
            "--vocab-size, --task-index and --finalize do not apply"
        )
    overrides = list(args.overrides)
    config = args.config
    if config is not None and "=" in config:
        overrides.insert(0, config)
        config = None
    if args.task is not None:
        overrides.append(f"task={json_str(args.task)}")
    if args.output:
        overrides.append(f"output={json_str(args.output)}")
    if args.seq_len is not None:
        overrides.append(f"seq_len={args.seq_len}")
    if args.overwrite:
        overrides.append("overwrite=true")
    t0 = time.monotonic()
    cfg = load_config(TaskPrepConfig, config, overrides)
    manifest = prepare_task(cfg)
    print_summary(cfg.output, manifest, time.monotonic() - t0)
    return 0


def _verify_or_inspect(args) -> int:
    from data_prep.verify import inspect_dataset, verify_dataset

    if len(args.overrides) != 1:
        raise RdptConfigError(f"usage: rdpt prep {args.config} DIR")
    if args.config == "verify":
        verify_dataset(args.overrides[0], decode=args.decode)
    else:
        inspect_dataset(args.overrides[0])
    return 0


def print_summary(output: str, manifest: dict, elapsed: float) -> None:
    """The end-of-run table: per split documents, tokens, sequences, shards, size."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dataset {output}")
    for col in ("split", "documents", "tokens", "sequences", "shards", "MiB"):
        table.add_column(col, justify="left" if col == "split" else "right")
    total_tokens = 0
    for split, info in manifest["splits"].items():
        total_tokens += info["tokens"]
        mib = sum(s.get("bytes", 0) for s in info["shards"]) / 2**20
        table.add_row(
            split,
            f"{info['documents']:,}",
            f"{info['tokens']:,}",
            f"{info['sequences']:,}",
            str(len(info["shards"])),
            f"{mib:.1f}",
        )
    console = Console()
    console.print(table)
    skipped = manifest.get("skipped", {}).get("counts", {})
    console.print(
        f"seq_len {manifest['seq_len']}, {manifest['dtype']}, vocab {manifest['vocab_size']}, "
        f"encoder {manifest['tokenizer']['encoder']}; skipped inputs: {skipped or 'none'}; "
        f"{elapsed:.1f} s"
    )
