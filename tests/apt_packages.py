"""Debian packages the tests need and install themselves when missing (CI runs as root on a
machine that reaches the Debian mirror): Slurm (fixtures_slurm), chromium (fixtures_mlflow), a
C compiler (fixtures_model)."""

from __future__ import annotations

import os
import subprocess

import pytest


def apt_install(*packages: str, options: tuple[str, ...] = ()) -> None:
    """apt-get update, then apt-get install `packages`; fails the calling test with apt's output
    when that fails, or when not root."""
    if os.geteuid() != 0:
        pytest.fail(f"{' '.join(packages)}: not installed, and installing them needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", *options, *packages],
    ):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
