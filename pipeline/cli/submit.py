"""`rdpt submit train|prep` and `rdpt jobs [cancel ID]`: Slurm launch from the command line."""

from __future__ import annotations

import argparse
import json

from pipeline.common.cli_args import OverridesParser

SUBMIT_EPILOG = """\
examples:
  rdpt submit train configs/train/tiny.yaml --nodes 2 --gpus-per-node 8 --time 24:00:00 \\
      --partition gpu --account proj run.name=big data.path=data/web
  rdpt submit train configs/train/tiny.yaml --nodes 1 --gpus-per-node 0 --ntasks-per-node 2 \\
      --chain 3 --time 4:00:00 run.name=cpu-test
  rdpt submit train configs/train/tiny.yaml --gpus-per-node 4 --dry-run   # print, submit nothing
  rdpt submit prep configs/data/web.yaml --array 16 --cpus-per-task 8

Cluster defaults (partition, account, modules, environment, container) come from the site
config: --site FILE, else $RDPT_SITE_CONFIG, else configs/site/site.yaml (see
configs/site/example.yaml). The job script is written into the run directory
(<run_dir>/slurm/); the job runs `rdpt train <run_dir>/resolved.yaml --resume auto`."""

JOBS_EPILOG = """\
examples:
  rdpt jobs                 # the jobs submitted from this project, with their Slurm state
  rdpt jobs --json          # the same as JSON lines
  rdpt jobs cancel 1234     # cancel job 1234 (and the later jobs of its chain); no requeue"""


def _add_sbatch_options(p: argparse.ArgumentParser, *, train: bool) -> None:
    g = p.add_argument_group("Slurm resources (default: the site config)")
    if train:
        g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
        g.add_argument(
            "--gpus-per-node",
            type=int,
            default=None,
            help="GPUs per node = processes per node; 0 = CPU processes",
        )
        g.add_argument(
            "--ntasks-per-node",
            "--tasks-per-node",
            dest="ntasks_per_node",
            type=int,
            default=None,
            help="processes per node when --gpus-per-node 0",
        )
    g.add_argument("--cpus-per-task", type=int, default=None)
    g.add_argument("--mem", default=None, help='memory per node, e.g. "0" (all) or "64G"')
    g.add_argument("--time", default=None, help="time limit, e.g. 24:00:00 or 2-00:00:00")
    g.add_argument("--partition", "-p", default=None)
    g.add_argument("--account", "-A", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", "-C", default=None)
    g.add_argument("--exclusive", action="store_true", default=None)
    g.add_argument("--mail-user", default=None)
    g.add_argument("--mail-type", default=None, help="default END,FAIL")
    p.add_argument("--site", default=None, help="site config YAML (see configs/site/example.yaml)")
    p.add_argument("--job-name", default=None)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything, print the resolved config and job script(s), "
        "submit nothing, write nothing",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")


def register(subparsers) -> None:
    submit = subparsers.add_parser(
        "submit",
        help="submit training or data preparation to Slurm",
        description="Render a Slurm job script from slurm/*.sbatch, write it into the run "
        "directory and submit it with sbatch. Bad input (config, layout, partition, account, "
        "run directory) is reported before anything is submitted.",
        epilog=SUBMIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = submit.add_subparsers(
        dest="kind", metavar="KIND", required=True, parser_class=OverridesParser
    )
    train = kinds.add_parser(
        "train",
        help="a (multi-node) training job; preemption-safe, optionally chained",
        description="Submit `rdpt train` as a Slurm job: srun starts one process per GPU "
        "(or --ntasks-per-node CPU processes), ranks come from SLURM_*. USR1 "
        "--signal-warn seconds before the time limit (or TERM) -> checkpoint -> requeue.",
        epilog=SUBMIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_sbatch_options(train, train=True)
    train.add_argument(
        "--signal-warn",
        type=int,
        default=None,
        metavar="SECONDS",
        help="send USR1 this long before the time limit (default: site, 300)",
    )
    train.add_argument(
        "--chain",
        type=int,
        default=1,
        metavar="K",
        help="submit K jobs linked by afterany, each continuing the run",
    )
    train.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="KEY",
        help="continue an existing run whose config differs in KEY (see rdpt train --help)",
    )
    train.set_defaults(func=handle_submit_train)
    prep = kinds.add_parser(
        "prep",
        help="data preparation as a job array + a finalize job",
        description="Split `rdpt prep` across an M-task job array (each task writes its own "
        "shards); an afterok job merges them into one manifest and verifies it.",
        epilog=SUBMIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_sbatch_options(prep, train=False)
    prep.add_argument("--array", type=int, required=True, metavar="M", help="array tasks")
    prep.set_defaults(func=handle_submit_prep)

    jobs = subparsers.add_parser(
        "jobs",
        help="list (or cancel) the Slurm jobs submitted from this project",
        description="List the jobs submitted with `rdpt submit` from this directory "
        "(.rdpt/jobs.jsonl) with their state from squeue/scontrol/sacct.",
        epilog=JOBS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    jobs.add_argument("--limit", type=int, default=None, help="only the last N jobs")
    jobs.add_argument("--json", action="store_true", help="one JSON object per line")
    jobs.set_defaults(func=handle_jobs)
    actions = jobs.add_subparsers(dest="action", metavar="ACTION")
    cancel = actions.add_parser(
        "cancel",
        help="cancel a job (and the later jobs of its chain) without requeueing it",
        description="Cancel a job submitted from this project; a training job checkpoints "
        "on the TERM and is not requeued; later jobs of its chain are cancelled too.",
        epilog="example:\n  rdpt jobs cancel 1234",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cancel.add_argument("job_id", type=int)
    cancel.set_defaults(func=handle_cancel)


def _options(args, site, *, train: bool):
    from launch.render import SbatchOptions

    over = dict(
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        time=args.time,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        exclusive=args.exclusive,
        mail_user=args.mail_user,
        mail_type=args.mail_type,
    )
    if train:
        over.update(
            nodes=args.nodes, gpus_per_node=args.gpus_per_node, ntasks_per_node=args.ntasks_per_node
        )
    return SbatchOptions.from_site(site, **over)


def _print_dry_run(resolved_yaml: str, resolved_where, jobs) -> None:
    print(f"# ---- resolved config (submit would write {resolved_where}) ----")
    print(resolved_yaml.rstrip())
    for job in jobs:
        dep = f" (--dependency={job.dependency}:<previous job>)" if job.dependency else ""
        print(f"\n# ---- job script (submit would write {job.script_path}){dep} ----")
        print(job.script.rstrip())
    print("\n# dry run: nothing was written or submitted")


def handle_submit_train(args) -> int:
    from launch.site import load_site_config
    from launch.submit import check_train, plan_train, submit_train

    site, _ = load_site_config(args.site)
    opts = _options(args, site, train=True)
    plan = plan_train(
        args.config,
        args.overrides,
        opts,
        site,
        chain=args.chain,
        signal_warn_s=args.signal_warn,
        job_name=args.job_name,
    )
    plan.allow_change = list(args.allow_change)
    check_train(plan, dry_run=args.dry_run)
    if args.dry_run:
        _print_dry_run(plan.resolved_yaml, plan.run_dir / "resolved.yaml", plan.jobs)
        return 0
    result = submit_train(plan)
    mlflow = result.mlflow or {}
    if args.json:
        print(
            json.dumps(
                {
                    "job_ids": result.job_ids,
                    "run_dir": str(result.run_dir),
                    "scripts": [str(s) for s in result.scripts],
                    "mlflow": result.mlflow,
                }
            )
        )
        return 0
    for k, (jid, script) in enumerate(zip(result.job_ids, result.scripts), 1):
        chain = f" (chain {k}/{len(result.job_ids)})" if len(result.job_ids) > 1 else ""
        print(f"submitted job {jid}{chain}: {script}")
    print(f"run directory: {result.run_dir}")
    print(f"log:           {result.run_dir}/slurm/slurm-{result.job_ids[0]}.out")
    if mlflow and mlflow["run_id"]:
        print(
            f"mlflow run:    {mlflow['run_id']} (experiment {mlflow['experiment']!r} at "
            f"{mlflow['tracking_uri']})"
        )
    elif mlflow:
        print(
            f"mlflow run:    not created yet ({mlflow['tracking_uri']} not reachable now; "
            f"training creates it)"
        )
    else:
        print("mlflow run:    none (tracking disabled or no tracking.uri / MLFLOW_TRACKING_URI)")
    return 0


def handle_submit_prep(args) -> int:
    from launch.prep import check_prep, plan_prep, submit_prep
    from launch.site import load_site_config

    site, _ = load_site_config(args.site)
    opts = _options(args, site, train=False)
    plan = plan_prep(
        args.config, args.overrides, opts, site, array=args.array, job_name=args.job_name
    )
    check_prep(plan, dry_run=args.dry_run)
    if args.dry_run:
        _print_dry_run(plan.resolved_yaml, plan.job_dir / "prep.yaml", plan.jobs)
        return 0
    result = submit_prep(plan)
    if args.json:
        print(
            json.dumps(
                {
                    "job_ids": result.job_ids,
                    "output": str(plan.output),
                    "scripts": [str(s) for s in result.scripts],
                }
            )
        )
        return 0
    print(f"submitted array job {result.job_ids[0]} ({plan.array} tasks): {result.scripts[0]}")
    print(
        f"submitted finalize job {result.job_ids[1]} (afterok:{result.job_ids[0]}): "
        f"{result.scripts[1]}"
    )
    print(f"output: {plan.output}")
    print(f"logs:   {plan.job_dir}")
    return 0


def handle_jobs(args) -> int:
    from launch.jobs import format_table, job_rows

    rows = job_rows(limit=args.limit)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_table(rows))
    return 0


def handle_cancel(args) -> int:
    from launch.jobs import cancel

    ids = cancel(args.job_id)
    print("cancelled " + ", ".join(str(j) for j in ids))
    return 0
