"""`rdpt submit prep`: a job array that encodes the input in M slices + one finalize job.

    plan = plan_prep("configs/data/web.yaml", [], SbatchOptions(...), site, array=8)
    result = submit_prep(plan)   # array job, then finalize with --dependency=afterok:<array>

Task I of M runs `rdpt prep <config> --task-index env` (it reads SLURM_ARRAY_TASK_ID and
SLURM_ARRAY_TASK_COUNT) and tokenises its share of the input chunks (chunk c goes to task
c % M); the finalize job runs `rdpt prep <config> --finalize`, which packs the chunks in order
into shards, writes one manifest and verifies it. The result
is identical to a single-process `rdpt prep <config>` (the DATA area guarantees it; a test
checks it on a real cluster).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from launch.render import (
    SbatchOptions,
    environment_block,
    python_command,
    render_template,
    sbatch_lines,
    shell_join,
)
from launch.site import SiteConfig
from launch.submit import (
    JobPlan,
    SubmitResult,
    check_cluster_or_warn,
    check_options,
    check_paths,
    sbatch_jobs,
)
from pipeline.common.errors import RdptLaunchError

MAX_ARRAY = 10000


@dataclass
class PrepPlan:
    cfg: object  # data_prep.config.PrepConfig
    output: Path
    job_dir: Path  # .rdpt/prep/<name>-<stamp>/: resolved config, scripts, logs
    array: int
    opts: SbatchOptions
    resolved_yaml: str
    jobs: list[JobPlan] = field(default_factory=list)


def _absolute(p: str) -> str:
    """Inputs and output relative to the submit directory, made absolute (not `@stdlib`)."""
    if p.startswith("@") or Path(p).is_absolute():
        return p
    return str(Path.cwd() / p)


def plan_prep(
    config_path: str,
    overrides: list[str],
    opts: SbatchOptions,
    site: SiteConfig,
    *,
    array: int,
    job_name: str | None = None,
) -> PrepPlan:
    """Validate the prep config and render the array + finalize scripts; no side effects."""
    from data_prep.config import PrepConfig
    from pipeline.common.config_io import load_config, to_yaml

    if not 1 <= array <= MAX_ARRAY:
        raise RdptLaunchError(f"--array must be between 1 and {MAX_ARRAY}, got {array}")
    check_options(opts, signal_warn_s=0, chain=1)
    cfg = load_config(PrepConfig, config_path, overrides)
    if not cfg.output:
        raise RdptLaunchError(
            f"{config_path}: `output` is not set (where should the dataset go? add output=...)"
        )
    # NOTE: the resolved config lives in .rdpt/prep/, so relative paths must not depend on it.
    cfg.output = _absolute(cfg.output)
    cfg.inputs = [_absolute(p) for p in cfg.inputs]
    if cfg.tokenizer.path:
        cfg.tokenizer.path = _absolute(cfg.tokenizer.path)
    if opts.cpus_per_task and cfg.workers is None:
        cfg.workers = opts.cpus_per_task
    output = Path(cfg.output)
    name = job_name or f"rdpt-prep-{output.name}"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", output.name)
    job_dir = (Path(".rdpt") / "prep" / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    check_paths(job_dir)
    plan = PrepPlan(cfg, output, job_dir, array, opts, to_yaml(cfg))
    config_file = job_dir / "prep.yaml"
    common = {
        "config": str(config_file),
        "output": str(output),
        "log_dir": str(job_dir),
        "workdir": str(Path.cwd()),
        "environment": environment_block(site, {"OMP_NUM_THREADS": str(opts.cpus_per_task or 1)}),
    }
    array_values = {
        **common,
        "job_name": name,
        "last_task": array - 1,
        "sbatch_directives": sbatch_lines(opts, per_node_tasks=False),
        "command": shell_join(
            python_command(site, ["prep", str(config_file), "--task-index", "env"])
        ),
    }
    final_values = {
        **common,
        "job_name": f"{name}-finalize",
        "sbatch_directives": sbatch_lines(opts, per_node_tasks=False),
        "command": shell_join(python_command(site, ["prep", str(config_file), "--finalize"])),
    }
    tdir = site.slurm.template_dir
    plan.jobs.append(
        JobPlan(
            name,
            job_dir / "prep-array.sbatch",
            render_template("prep-array.sbatch", array_values, tdir),
        )
    )
    plan.jobs.append(
        JobPlan(
            f"{name}-finalize",
            job_dir / "prep-finalize.sbatch",
            render_template("prep-finalize.sbatch", final_values, tdir),
            "afterok",
        )
    )
    return plan


def check_prep(plan: PrepPlan, *, dry_run: bool) -> None:
    check_cluster_or_warn(plan.opts, dry_run=dry_run)


def submit_prep(plan: PrepPlan) -> SubmitResult:
    from pipeline.common.atomic import atomic_write_text

    plan.job_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.job_dir / "prep.yaml", plan.resolved_yaml)
    ids = sbatch_jobs(
        plan.jobs,
        plan.output,
        lambda k, job, job_id: {
            "kind": "prep-finalize" if job.dependency else "prep-array",
            "log": str(plan.job_dir),
            "array": None if job.dependency else plan.array,
        },
    )
    return SubmitResult(ids, plan.output, [j.script_path for j in plan.jobs])
