"""Thin wrappers around the Slurm client commands (sbatch, squeue, sinfo, scontrol, sacct).

Every call goes through `run_slurm`, which raises RdptLaunchError naming the command and its
stderr; no shell is involved (arguments are passed as a list).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from pipeline.common.errors import RdptLaunchError


def available(command: str = "sbatch") -> bool:
    return shutil.which(command) is not None


def config_file() -> Path | None:
    """The slurm.conf clients will read ($SLURM_CONF, the default path, configless cache)."""
    import os

    if os.environ.get("SLURM_CONF"):
        path = Path(os.environ["SLURM_CONF"])
        return path if path.is_file() else None
    for path in (Path("/etc/slurm/slurm.conf"), Path("/run/slurm/conf/slurm.conf")):
        if path.is_file():
            return path
    return None


def run_slurm(args: Sequence[str], timeout: float = 60, check: bool = True) -> str:
    """Run a Slurm client command; return stdout (RdptLaunchError on failure when check)."""
    if not available(args[0]):
        raise RdptLaunchError(f"{args[0]} not found on PATH: is this a Slurm login node?")
    try:
        out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RdptLaunchError(f"`{' '.join(args)}` did not answer within {timeout:.0f} s") from None
    if check and out.returncode != 0:
        msg = (out.stderr or out.stdout).strip()
        raise RdptLaunchError(f"`{' '.join(args)}` failed (exit {out.returncode}): {msg}")
    return out.stdout


def sbatch(script: str | Path, dependency: str | None = None, extra: Sequence[str] = ()) -> int:
    """Submit a batch script; return the job id."""
    args = ["sbatch", "--parsable"]
    if dependency:
        args.append(f"--dependency={dependency}")
    args += [*extra, str(script)]
    out = run_slurm(args).strip()
    m = re.match(r"^(\d+)", out)
    if not m:
        raise RdptLaunchError(f"sbatch printed no job id: {out!r}")
    return int(m.group(1))


def parse_kv_line(line: str) -> dict[str, str]:
    """`Key=Value Key2=Value2 ...` (one `scontrol show -o` record) -> dict."""
    return dict(re.findall(r"(\w+)=(\S*)", line))


def scontrol_job(job_id: int | str) -> dict[str, str] | None:
    """`scontrol show job -o ID` as a dict, or None when the controller no longer knows it.

    For an array job this is the first task's record; use `scontrol_jobs` for all of them.
    """
    records = scontrol_jobs(job_id)
    return records[0] if records else None


def scontrol_jobs(job_id: int | str) -> list[dict[str, str]]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=60
    )
    if out.returncode != 0:
        return []
    return [parse_kv_line(line) for line in out.stdout.splitlines() if line.strip()]


def partitions() -> dict[str, dict[str, str]]:
    """Partition name -> `scontrol show partition -o` record (AllowAccounts, Nodes, ...)."""
    out = run_slurm(["scontrol", "show", "partition", "-o"])
    parts = {}
    for line in out.splitlines():
        rec = parse_kv_line(line)
        if "PartitionName" in rec:
            parts[rec["PartitionName"]] = rec
    return parts


def default_partition(parts: dict[str, dict[str, str]]) -> str | None:
    for name, rec in parts.items():
        if rec.get("Default") == "YES":
            return name
    return None


def partition_gpus_per_node(partition: str) -> int:
    """Largest number of GPUs (gres gpu[:type]:N) on a node of `partition` (0 when none)."""
    out = run_slurm(["sinfo", "-h", "-p", partition, "-o", "%G"])
    best = 0
    for entry in out.replace("\n", ",").split(","):
        m = re.match(r"gpu(?::[^:(]+)?:(\d+)", entry.strip())
        if m:
            best = max(best, int(m.group(1)))
    return best


def user_accounts() -> set[str] | None:
    """Accounts of the current user from `sacctmgr` (None when there is no accounting DB)."""
    if not available("sacctmgr"):
        return None
    out = subprocess.run(
        [
            "sacctmgr",
            "-n",
            "-P",
            "show",
            "associations",
            "where",
            f"user={_user()}",
            "format=account",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if out.returncode != 0:
        return None
    accounts = {line.strip() for line in out.stdout.splitlines() if line.strip()}
    return accounts or None


def _user() -> str:
    import getpass

    return getpass.getuser()


def squeue(job_ids: Sequence[int]) -> dict[str, dict[str, str]]:
    """Active jobs among `job_ids`: id -> {state, name, nodes, elapsed, reason}."""
    if not job_ids:
        return {}
    out = run_slurm(
        ["squeue", "-h", "-j", ",".join(str(j) for j in job_ids), "-o", "%i|%j|%T|%D|%M|%R"],
        check=False,
    )
    rows = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) == 6:
            rows[parts[0]] = dict(zip(("id", "name", "state", "nodes", "elapsed", "reason"), parts))
    return rows


def sacct(job_ids: Sequence[int]) -> dict[str, dict[str, str]]:
    """Finished jobs from the accounting DB (or `sacct -c`, the job-completion log)."""
    if not job_ids or not available("sacct"):
        return {}
    fmt = "JobID,JobName,State,NNodes,Elapsed,ExitCode"
    ids = ",".join(str(j) for j in job_ids)
    for extra in ([], ["-c"]):
        out = subprocess.run(
            ["sacct", *extra, "-n", "-P", "-X", "-j", ids, "-o", fmt],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0 or not out.stdout.strip():
            continue
        rows: dict[str, dict[str, str]] = {}
        for line in out.stdout.splitlines():  # the last line of a job id is its final state
            parts = line.split("|")
            if len(parts) == 6:
                rows[parts[0]] = dict(
                    zip(("id", "name", "state", "nodes", "elapsed", "exit_code"), parts)
                )
        if rows:
            return rows
    return {}
