"""Render the sbatch templates of slurm/ into job scripts with resolved values.

    text = render_template("train.sbatch", values)          # values: {"job_name": "...", ...}

Templates are plain bash with `{{ name }}` placeholders, so a copy stays readable and editable.
Every placeholder must get a value and every value must be used (typos fail loudly). Values
that end up in shell commands are quoted here (`shlex.quote`); #SBATCH lines are built by
`sbatch_lines`, one option per line.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from launch.site import SiteConfig
from pipeline.common.errors import RdptLaunchError

# slurm/ in the source tree; launch/templates links to it, and a built wheel holds copies there
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
PLACEHOLDER = re.compile(r"\{\{\s*([a-z_][a-z0-9_]*)\s*\}\}")


def template_path(name: str, template_dir: str | Path | None = None) -> Path:
    path = Path(template_dir or TEMPLATE_DIR) / name
    if not path.is_file():
        raise RdptLaunchError(f"sbatch template not found: {path}")
    return path


def render_template(
    name: str, values: dict[str, object], template_dir: str | Path | None = None
) -> str:
    """Fill `{{ name }}` placeholders of template `name`; unknown or unused keys are errors."""
    path = template_path(name, template_dir)
    text = path.read_text(encoding="utf-8")
    used = set(PLACEHOLDER.findall(text))
    missing = sorted(used - values.keys())
    if missing:
        raise RdptLaunchError(f"{path}: no value for placeholder(s) {', '.join(missing)}")
    unused = sorted(values.keys() - used)
    if unused and template_dir is None:  # a user's edited copy may drop placeholders
        raise RdptLaunchError(f"{path}: template has no placeholder for {', '.join(unused)}")
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


# ------------------------------------------------------------------------ building the values


@dataclass
class SbatchOptions:
    """Resolved #SBATCH options of one job (site defaults merged with the command line)."""

    nodes: int = 1
    ntasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None
    exclusive: bool = False
    mail_user: str | None = None
    mail_type: str = "END,FAIL"
    extra: list[str] = field(default_factory=list)

    @classmethod
    def from_site(cls, site: SiteConfig, **overrides) -> SbatchOptions:
        s = site.slurm
        opts = cls(
            gpus_per_node=s.gpus_per_node,
            ntasks_per_node=s.ntasks_per_node,
            cpus_per_task=s.cpus_per_task,
            time=s.time,
            partition=s.partition,
            account=s.account,
            qos=s.qos,
            constraint=s.constraint,
            mem=s.mem,
            exclusive=s.exclusive,
            mail_user=s.mail_user,
            mail_type=s.mail_type,
            extra=list(s.extra_sbatch),
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(opts, key, value)
        return opts

    @property
    def tasks_per_node(self) -> int:
        """One process per GPU; --ntasks-per-node processes on CPU-only nodes."""
        return self.gpus_per_node if self.gpus_per_node > 0 else self.ntasks_per_node


def sbatch_lines(opts: SbatchOptions, *, per_node_tasks: bool = True) -> str:
    """The `#SBATCH` lines for resources, placement and mail (one option per line)."""
    lines: list[str] = []
    if per_node_tasks:
        lines.append(f"--nodes={opts.nodes}")
        lines.append(f"--ntasks-per-node={opts.tasks_per_node}")
        if opts.gpus_per_node:
            lines.append(f"--gpus-per-node={opts.gpus_per_node}")
    else:
        lines.append("--ntasks=1")
    if opts.cpus_per_task:
        lines.append(f"--cpus-per-task={opts.cpus_per_task}")
    if opts.mem:
        lines.append(f"--mem={opts.mem}")
    lines.append(f"--time={opts.time}")
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(opts, key)
        if value:
            lines.append(f"--{key}={value}")
    if opts.exclusive:
        lines.append("--exclusive")
    if opts.mail_user:
        lines.append(f"--mail-user={opts.mail_user}")
        lines.append(f"--mail-type={opts.mail_type}")
    lines.extend(opts.extra)
    for line in lines:
        if any(c in line for c in "\n\r"):
            raise RdptLaunchError(f"sbatch option {line!r} contains a line break")
    return "\n".join(f"#SBATCH {line}" for line in lines)


def environment_block(site: SiteConfig, extra_vars: dict[str, str] | None = None) -> str:
    """Shell lines that prepare the job's environment: modules, setup lines, variables."""
    env = site.env
    lines: list[str] = []
    for module in env.modules:
        lines.append(f"module load {shlex.quote(module)}")
    lines.extend(env.setup)
    variables = dict(env.variables)
    variables.update(extra_vars or {})
    for name, value in variables.items():
        lines.append(f"export {name}={shlex.quote(str(value))}")
    return "\n".join(lines) if lines else "# (nothing to set up: see env: in the site config)"


def container_prefix(site: SiteConfig) -> tuple[list[str], list[str]]:
    """(extra srun options, command prefix) that run the step's processes in the container."""
    c = site.env.container
    if not c.image:
        return [], []
    if c.runtime == "pyxis":
        srun = [f"--container-image={c.image}"]
        if c.mounts:
            srun.append(f"--container-mounts={','.join(c.mounts)}")
        return srun, []
    prefix = ["apptainer", "exec", "--nv"]
    for m in c.mounts:
        prefix += ["--bind", m]
    return [], prefix + [c.image]


def shell_join(args: Iterable[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def python_command(site: SiteConfig, args: Sequence[str]) -> list[str]:
    """`<python> -m pipeline.cli ARGS...`, wrapped for the container when one is configured."""
    _, prefix = container_prefix(site)
    return [*prefix, site.python(), "-m", "pipeline.cli", *args]
