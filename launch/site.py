"""Site config: what one cluster needs in every job script, written once per cluster.

    site = load_site_config("configs/site/mycluster.yaml")   # or None: built-in defaults

Where it is found (first hit wins): `rdpt submit --site PATH`, `$RDPT_SITE_CONFIG`,
`configs/site/site.yaml` in the current directory, else the defaults below (no partition, no
account, the Python interpreter that runs `rdpt submit`). Command-line options of
`rdpt submit` override the `slurm:` values. See configs/site/example.yaml.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from pipeline.common.config_io import ConfigModel, load_config

DEFAULT_SITE_PATH = Path("configs/site/site.yaml")
SITE_ENV_VAR = "RDPT_SITE_CONFIG"


class SlurmDefaults(ConfigModel):
    """Defaults for #SBATCH options; each can be overridden on the `rdpt submit` command line."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time: str = "24:00:00"
    gpus_per_node: int = Field(0, ge=0)
    ntasks_per_node: int = Field(1, ge=1, description="processes per node when gpus_per_node=0")
    cpus_per_task: int | None = Field(None, ge=1)
    mem: str | None = None  # e.g. "0" (all memory of the node) or "64G"
    exclusive: bool = False
    signal_warn_s: int = Field(300, ge=10, description="USR1 this many seconds before the limit")
    mail_user: str | None = None
    mail_type: str = "END,FAIL"
    extra_sbatch: list[str] = Field(default_factory=list, description='e.g. ["--reservation=x"]')
    template_dir: str | None = None  # a copy of slurm/ with your own edits

    @field_validator("extra_sbatch")
    @classmethod
    def _long_options(cls, v: list[str]) -> list[str]:
        for opt in v:
            if not opt.startswith("--") or any(c in opt for c in "\n\r"):
                raise ValueError(f"extra_sbatch entry {opt!r} must be one '--option[=value]'")
        return v


class ContainerConfig(ConfigModel):
    """Run the job's processes in a container (pyxis: `srun --container-image`, or apptainer)."""

    image: str | None = None
    runtime: Literal["pyxis", "apptainer"] = "pyxis"
    mounts: list[str] = Field(default_factory=list)  # "src:dst" pairs


class JobEnvironment(ConfigModel):
    """How the job script gets a working Python before it starts anything."""

    modules: list[str] = Field(default_factory=list)  # `module load` each, in order
    setup: list[str] = Field(default_factory=list)  # shell lines, e.g. "source ~/venv/bin/activate"
    python: str | None = None  # default: the interpreter running `rdpt submit`
    variables: dict[str, str] = Field(default_factory=dict)  # exported in the job script
    container: ContainerConfig = Field(default_factory=ContainerConfig)

    @field_validator("variables")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not name.replace("_", "a").isalnum() or name[0].isdigit():
                raise ValueError(f"environment variable name {name!r} is not valid in bash")
        return v


class SiteConfig(ConfigModel):
    """One cluster's defaults (configs/site/*.yaml)."""

    slurm: SlurmDefaults = Field(default_factory=SlurmDefaults)
    env: JobEnvironment = Field(default_factory=JobEnvironment)

    def python(self) -> str:
        """The Python that runs rdpt inside the job."""
        return self.env.python or sys.executable


def find_site_config(explicit: str | os.PathLike | None = None) -> Path | None:
    """The site config file to use (see module docstring), or None for the defaults."""
    if explicit:
        return Path(explicit)
    if os.environ.get(SITE_ENV_VAR):
        return Path(os.environ[SITE_ENV_VAR])
    if DEFAULT_SITE_PATH.is_file():
        return DEFAULT_SITE_PATH
    return None


def load_site_config(path: str | os.PathLike | None = None) -> tuple[SiteConfig, Path | None]:
    """Load and validate the site config (errors name the file and key); return it and its path."""
    found = find_site_config(path)
    if found is None:
        return SiteConfig(), None
    return load_config(SiteConfig, found), found
