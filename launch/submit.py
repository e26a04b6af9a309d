"""`rdpt submit train|prep`: validate, render the job scripts, submit them, record them.

    plan = plan_train("configs/train/tiny.yaml", ["run.name=x"], SbatchOptions(...), site, chain=2)
    check_train(plan)                  # every bad input, before sbatch (raises RdptLaunchError)
    print(plan.scripts[0])             # --dry-run stops here
    result = submit_train(plan)        # writes resolved.yaml + scripts, sbatch, registry, MLflow

One source of truth: the job runs `rdpt train <run_dir>/resolved.yaml --resume auto`, and that
file is the resolved config written here. Nothing in the job script repeats a config value.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from launch import registry, slurm_tools
from launch.render import (
    SbatchOptions,
    container_prefix,
    environment_block,
    python_command,
    render_template,
    sbatch_lines,
    shell_join,
)
from launch.site import SiteConfig
from pipeline.common.errors import RdptError, RdptLaunchError
from pipeline.common.exitcodes import REQUEUE

STEP_EXIT_WAIT_S = 120  # srun --wait: other ranks' grace after the first one exits
TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")


@dataclass
class JobPlan:
    """One sbatch submission: the rendered script and where it goes."""

    name: str
    script_path: Path
    script: str
    dependency: str | None = None  # "afterany:PREV" / "afterok:PREV" (PREV filled at submit)


@dataclass
class TrainPlan:
    config_path: str
    overrides: list[str]
    cfg: object  # pipeline.training.config.TrainConfig
    run_dir: Path
    opts: SbatchOptions
    site: SiteConfig
    chain: int
    signal_warn_s: int
    resolved_yaml: str
    jobs: list[JobPlan] = field(default_factory=list)
    allow_change: list[str] = field(default_factory=list)  # --allow-change KEY

    @property
    def world_size(self) -> int:
        return self.opts.nodes * self.opts.tasks_per_node


# ------------------------------------------------------------------------------- checks


def check_time(value: str) -> None:
    if not TIME_RE.match(value):
        raise RdptLaunchError(
            f"--time {value!r} is not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]])"
        )


def time_limit_seconds(value: str) -> int:
    """Slurm time string -> seconds (for the signal-warning sanity check)."""
    days = 0
    if "-" in value:
        d, value = value.split("-", 1)
        days = int(d)
        parts = [int(p) for p in value.split(":")]
        parts += [0] * (3 - len(parts))  # D-HH, D-HH:MM, D-HH:MM:SS
        h, m, s = parts
    else:
        parts = [int(p) for p in value.split(":")]
        if len(parts) == 1:
            h, m, s = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, s = 0, parts[0], parts[1]
        else:
            h, m, s = parts
    return ((days * 24 + h) * 60 + m) * 60 + s


def check_options(opts: SbatchOptions, signal_warn_s: int, chain: int) -> None:
    if opts.nodes < 1:
        raise RdptLaunchError(f"--nodes must be >= 1, got {opts.nodes}")
    if opts.gpus_per_node < 0:
        raise RdptLaunchError(f"--gpus-per-node must be >= 0, got {opts.gpus_per_node}")
    if opts.ntasks_per_node < 1:
        raise RdptLaunchError(f"--ntasks-per-node must be >= 1, got {opts.ntasks_per_node}")
    if chain < 1:
        raise RdptLaunchError(f"--chain must be >= 1, got {chain}")
    check_time(opts.time)
    limit = time_limit_seconds(opts.time)
    if signal_warn_s >= limit:
        raise RdptLaunchError(
            f"--signal-warn {signal_warn_s} s is not shorter than --time {opts.time} "
            f"({limit} s): the job would be signalled before it starts working"
        )
    if opts.mail_user and not re.fullmatch(r"[^@\s]+@[^@\s]+", opts.mail_user):
        raise RdptLaunchError(f"--mail-user {opts.mail_user!r} is not an e-mail address")


def check_layout(cfg, opts: SbatchOptions) -> None:
    """GPUs per node vs the config's TP x DP layout (tensor parallelism stays inside a node)."""
    from pipeline.training.layout import ParallelDims

    world = opts.nodes * opts.tasks_per_node
    tp = cfg.parallel.tp
    if opts.gpus_per_node and opts.gpus_per_node % tp:
        raise RdptLaunchError(
            f"--gpus-per-node {opts.gpus_per_node} is not a multiple of parallel.tp={tp}: "
            f"tensor-parallel groups must fit inside one node"
        )
    try:
        ParallelDims.from_config(cfg, world)
    except RdptError as e:
        raise RdptLaunchError(
            f"layout {opts.nodes} node(s) x {opts.tasks_per_node} process(es) = world {world} "
            f"does not fit the config: {e}"
        ) from None


def check_writable_dir(path: Path, create: bool) -> None:
    """The run directory can be created and written (probe file), or RdptLaunchError."""
    if path.exists() and not path.is_dir():
        raise RdptLaunchError(f"run directory {path} exists and is not a directory")
    if not create:  # dry run: look only, change nothing
        probe = path
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise RdptLaunchError(f"run directory {path} is not writable ({probe} is not)")
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise RdptLaunchError(f"run directory {path} is not writable: {e.strerror}") from None


def check_cluster(opts: SbatchOptions) -> None:
    """Partition, account and GPUs against what the cluster says (when Slurm is reachable)."""
    parts = slurm_tools.partitions()
    partition = opts.partition or slurm_tools.default_partition(parts)
    if opts.partition and opts.partition not in parts:
        raise RdptLaunchError(
            f"unknown partition {opts.partition!r} (sinfo/scontrol list: "
            f"{', '.join(sorted(parts)) or 'none'})"
        )
    if partition is None:
        raise RdptLaunchError(
            f"no --partition given and the cluster has no default partition "
            f"(partitions: {', '.join(sorted(parts))})"
        )
    if opts.account:
        accounts = slurm_tools.user_accounts()
        if accounts is not None and opts.account not in accounts:
            raise RdptLaunchError(
                f"unknown account {opts.account!r} for this user (sacctmgr lists: "
                f"{', '.join(sorted(accounts))})"
            )
        allowed = parts[partition].get("AllowAccounts", "ALL")
        if allowed != "ALL" and opts.account not in allowed.split(","):
            raise RdptLaunchError(
                f"account {opts.account!r} may not use partition {partition!r} "
                f"(AllowAccounts={allowed})"
            )
        denied = parts[partition].get("DenyAccounts", "")
        if opts.account in denied.split(","):
            raise RdptLaunchError(f"account {opts.account!r} is denied on partition {partition!r}")
    elif parts[partition].get("AllowAccounts", "ALL") != "ALL":
        raise RdptLaunchError(
            f"partition {partition!r} needs --account (AllowAccounts="
            f"{parts[partition]['AllowAccounts']})"
        )
    if opts.gpus_per_node:
        have = slurm_tools.partition_gpus_per_node(partition)
        if have < opts.gpus_per_node:
            raise RdptLaunchError(
                f"--gpus-per-node {opts.gpus_per_node}: nodes of partition {partition!r} have "
                f"{have} GPU(s) (sinfo %G)"
            )
    total_nodes = int(parts[partition].get("TotalNodes", "0") or 0)
    if total_nodes and opts.nodes > total_nodes:
        raise RdptLaunchError(
            f"--nodes {opts.nodes}: partition {partition!r} has only {total_nodes} node(s)"
        )


def check_paths(run_dir: Path) -> None:
    # NOTE: #SBATCH lines are not parsed by a shell, so a path with spaces cannot be quoted there.
    if any(c.isspace() for c in str(run_dir)):
        raise RdptLaunchError(f"run directory {str(run_dir)!r} contains whitespace (not allowed)")


# ------------------------------------------------------------------------------- train


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def plan_train(
    config_path: str,
    overrides: list[str],
    opts: SbatchOptions,
    site: SiteConfig,
    *,
    chain: int = 1,
    signal_warn_s: int | None = None,
    job_name: str | None = None,
    command: list[str] | None = None,
) -> TrainPlan:
    """Validate the config against the layout and render the job script(s); no side effects.

    `command` replaces the training command (tests run a stand-in that obeys the same contract).
    """
    from pipeline.common.config_io import to_yaml
    from pipeline.training.config import load_train_config

    warn = site.slurm.signal_warn_s if signal_warn_s is None else signal_warn_s
    check_options(opts, warn, chain)
    from pipeline.training.resolve import resolve

    cfg = load_train_config(config_path, overrides)
    check_layout(cfg, opts)
    check_paths(cfg.run_dir().resolve())
    # The config exactly as `rdpt train` resolves it inside the job (absolute paths, vocab from
    # the dataset, parallel.nproc = world size), after every check of the dataset and layout.
    cfg, _ = resolve(cfg, opts.nodes * opts.tasks_per_node)
    run_dir = cfg.run_dir()
    plan = TrainPlan(
        config_path=config_path,
        overrides=list(overrides),
        cfg=cfg,
        run_dir=run_dir,
        opts=opts,
        site=site,
        chain=chain,
        signal_warn_s=warn,
        resolved_yaml=to_yaml(cfg),
    )
    name = job_name or f"rdpt-{cfg.run.name}"
    log_dir = run_dir / "slurm"
    config_file = run_dir / "resolved.yaml"
    train_cmd = command or python_command(site, ["train", str(config_file), "--resume", "auto"])
    srun_container, _ = container_prefix(site)
    # NOTE: not --kill-on-bad-exit: the first rank to exit 85 would get the others killed
    # while they finish exiting (srun then returns 143, not 85). --wait bounds how long the
    # other ranks may live after the first one exits (a crashed rank leaves them in a collective).
    srun_opts = [
        "--kill-on-bad-exit=0",
        f"--wait={STEP_EXIT_WAIT_S}",
        "--export=ALL",
        *srun_container,
    ]
    if opts.cpus_per_task:
        # NOTE: srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05).
        srun_opts.append(f"--cpus-per-task={opts.cpus_per_task}")
    threads = str(opts.cpus_per_task or 1)
    stamp = _stamp()
    for k in range(1, chain + 1):
        suffix = f"-chain{k}of{chain}" if chain > 1 else ""
        script_path = log_dir / f"train-{stamp}{suffix}.sbatch"
        values = {
            "run_dir": str(run_dir),
            "run_dir_q": shlex.quote(str(run_dir)),
            "log_dir": str(log_dir),
            "log_dir_q": shlex.quote(str(log_dir)),
            "config": str(config_file),
            "chain_index": k,
            "chain_length": chain,
            "job_name": name,
            "sbatch_directives": sbatch_lines(opts),
            "signal_warn_s": warn,
            "workdir": str(Path.cwd()),
            # NOTE: only the last job of a chain requeues itself; earlier ones hand over.
            "requeue_on_signal": 1 if k == chain else 0,
            "environment": environment_block(site, {"OMP_NUM_THREADS": threads}),
            "srun_options": shell_join(srun_opts),
            "command": shell_join(train_cmd),
            "requeue_exit_code": REQUEUE,
        }
        script = render_template("train.sbatch", values, site.slurm.template_dir)
        dep = "afterany" if k > 1 else None
        plan.jobs.append(JobPlan(name=name, script_path=script_path, script=script, dependency=dep))
    return plan


def check_train(plan: TrainPlan, *, dry_run: bool) -> None:
    """Bad input that needs the disk or the cluster: dataset, run dir, partition, account..."""
    check_writable_dir(plan.run_dir, create=not dry_run)
    existing = plan.run_dir / "resolved.yaml"
    if existing.is_file():
        _check_same_config(existing, plan)
    check_cluster_or_warn(plan.opts, dry_run=dry_run)


def check_cluster_or_warn(opts: SbatchOptions, *, dry_run: bool) -> None:
    """check_cluster; in a dry run an unreachable Slurm is a warning (nothing is submitted)."""
    if not slurm_tools.available("scontrol"):
        if dry_run:
            print(
                "warning: no Slurm client on PATH: partition/account/GPUs not checked",
                file=sys.stderr,
            )
            return
        raise RdptLaunchError("scontrol/sbatch not found on PATH: is this a Slurm login node?")
    if dry_run and slurm_tools.config_file() is None:
        # NOTE: clients retry a missing slurm.conf for 60 s; a dry run should not wait for that.
        print(
            "warning: no slurm.conf ($SLURM_CONF, /etc/slurm/slurm.conf): partition/account/"
            "GPUs not checked",
            file=sys.stderr,
        )
        return
    try:
        slurm_tools.run_slurm(["scontrol", "ping"], timeout=20)
    except RdptLaunchError as e:
        if not dry_run:
            raise RdptLaunchError(f"cannot reach the Slurm controller: {e}") from None
        print(
            f"warning: Slurm not reachable, partition/account/GPUs not checked ({e})",
            file=sys.stderr,
        )
        return
    check_cluster(opts)


def _check_same_config(existing: Path, plan: TrainPlan) -> None:
    """Resubmitting a run continues it: only with a config it can continue exactly (the same
    comparison `rdpt train` makes, training/config_change.py), refused before anything queues."""
    import yaml

    from pipeline.training.config_change import check_continuation

    old = yaml.safe_load(existing.read_text()) or {}
    problems = check_continuation(old, yaml.safe_load(plan.resolved_yaml), plan.allow_change)
    if problems:
        raise RdptLaunchError(
            f"{existing} already holds a different config; continuing that run would change:\n  "
            + "\n  ".join(problems)
            + "\nor start a new run (run.name=...)"
        )


@dataclass
class SubmitResult:
    job_ids: list[int]
    run_dir: Path | None
    scripts: list[Path]
    mlflow: dict | None = None


def submit_train(plan: TrainPlan) -> SubmitResult:
    """Write resolved.yaml and the scripts, create the MLflow run, sbatch, record the jobs."""
    from pipeline.common.atomic import atomic_write_text

    log_dir = plan.run_dir / "slurm"
    log_dir.mkdir(parents=True, exist_ok=True)  # NOTE: a missing -o directory fails the job
    atomic_write_text(plan.run_dir / "resolved.yaml", plan.resolved_yaml)
    mlflow = ensure_mlflow_run(plan)
    ids = sbatch_jobs(
        plan.jobs,
        plan.run_dir,
        lambda k, job, job_id: {
            "kind": "train",
            "log": str(log_dir / f"slurm-{job_id}.out"),
            "chain": [k, plan.chain],
            "mlflow_run_id": (mlflow or {}).get("run_id"),
            "tracking_uri": (mlflow or {}).get("tracking_uri"),
            "argv": sys.argv[1:],
        },
    )
    return SubmitResult(ids, plan.run_dir, [j.script_path for j in plan.jobs], mlflow)


def sbatch_jobs(jobs: list, run_dir: Path, describe) -> list[int]:
    """Write each job's script, sbatch it (a job with a dependency type depends on the job
    submitted just before it) and append it to the project's job registry, with the fields
    `describe(index from 1, job, job_id)` adds. Returns the job ids in order."""
    from pipeline.common.atomic import atomic_write_text

    ids: list[int] = []
    for k, job in enumerate(jobs, 1):
        atomic_write_text(job.script_path, job.script)
        job.script_path.chmod(0o755)
        dep = f"{job.dependency}:{ids[-1]}" if job.dependency else None
        job_id = slurm_tools.sbatch(job.script_path, dependency=dep)
        ids.append(job_id)
        registry.append(
            {
                "job_id": job_id,
                "name": job.name,
                "run_dir": str(run_dir),
                "script": str(job.script_path),
                "dependency": dep,
                "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **describe(k, job, job_id),
            }
        )
    return ids


def ensure_mlflow_run(plan: TrainPlan) -> dict | None:
    """Create (or reuse) the run's MLflow run now, so submit can print it; None when off."""
    cfg = plan.cfg
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not cfg.tracking.enabled or not uri:
        return None
    from pipeline.tracking.logger import RunTracker

    # NOTE: never close() it here: that would mark the run FINISHED before training starts.
    tracker = RunTracker(
        plan.run_dir, uri, cfg.tracking.experiment, cfg.run.name, system_metrics_interval=0
    )
    run_id = tracker.ensure_run()  # None when the server is unreachable now (training retries)
    # tracker.tracking_uri: the bare URI (credentials, if any, went to MLflow's auth variables)
    return {
        "run_id": run_id,
        "tracking_uri": tracker.tracking_uri,
        "experiment": cfg.tracking.experiment,
    }
