"""Ranks of a process started by `srun`, in the torchrun variables the rest of rdpt reads.

    from pipeline.common.slurm_env import apply_slurm_env
    apply_slurm_env()          # first thing in `rdpt train`, before init_process_group()

Inside an srun step, Slurm tells each task who it is (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
SLURM_JOB_NODELIST, SLURM_JOB_ID); torch.distributed wants RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. This module translates one into the other, so a job needs no ssh,
no pdsh and no hostfile:

- RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID,
  LOCAL_WORLD_SIZE = tasks on this node, NODE_RANK = SLURM_NODEID.
- MASTER_ADDR = the first host of the step's node list (SLURM_STEP_NODELIST, else
  SLURM_JOB_NODELIST), expanded with `scontrol show hostnames` (a pure-Python expansion of the
  same syntax when scontrol is missing). Task 0 runs on that host. When that node name does not
  resolve, its NodeAddr from `scontrol show node` is used instead.
- MASTER_PORT = a port in [20000, 30000) derived from SLURM_JOB_ID: identical in every task of
  the job without any communication, below the Linux ephemeral range, and different for jobs
  that share a node (unless their ids are 10000 apart). A requeued job keeps its id and port.
- GLOO_SOCKET_IFNAME = the interface that routes to MASTER_ADDR, so gloo's sockets listen on the
  job's network only (torch's rendezvous store itself listens on every interface of the first
  node: see the trust model in the README).

It is a no-op outside an srun step (a login shell, the batch script itself, a laptop), and it
never overrides what a torchrun-style launcher set: when torch's elastic agent started this
process (TORCHELASTIC_RUN_ID is present) the rank variables are left alone. Otherwise Slurm's
ranks win over RANK / WORLD_SIZE / LOCAL_RANK found in the environment: sbatch exports the
submitting shell's environment, and a stale `RANK=0 WORLD_SIZE=1` from there would make every
task rank 0 of 1. MASTER_ADDR / MASTER_PORT are only filled in when missing (so
`export MASTER_PORT=...` in a job script wins; the rendered job script clears values inherited
from the submitting shell first).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import MutableMapping

PORT_BASE = 20000
PORT_SPAN = 10000

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
ELASTIC_AGENT_VAR = "TORCHELASTIC_RUN_ID"  # set by torchrun / torch's elastic agent


def in_srun_step(environ: MutableMapping[str, str] | None = None) -> bool:
    """True when this process is a task of an srun step (not the batch script, not a login)."""
    env = os.environ if environ is None else environ
    has_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    return has_step and "SLURM_PROCID" in env and "SLURM_JOB_ID" in env


def master_port_for_job(job_id: int | str) -> int:
    """The rendezvous port of a job: a pure function of its id (same in every task)."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a Slurm host list (`n[1-3,7],gpu-[01-02]-a`) the way `scontrol show hostnames` does.

    Uses scontrol when it is on PATH (the reference implementation); otherwise a Python
    expansion of the same syntax (comma-separated entries, bracket ranges with zero padding,
    several bracket groups per entry).
    """
    nodelist = nodelist.strip()
    if not nodelist:
        return []
    if shutil.which("scontrol"):
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()
    return expand_hostlist_python(nodelist)


def expand_hostlist_python(nodelist: str) -> list[str]:
    """Pure-Python host list expansion (fallback for `scontrol show hostnames`)."""
    hosts: list[str] = []
    for entry in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_entry(entry))
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        parts.append("".join(cur))
    return [p for p in (s.strip() for s in parts) if p]


def _expand_entry(entry: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", entry)
    if m is None:
        return [entry]
    head, tail = entry[: m.start()], entry[m.end() :]
    out: list[str] = []
    for item in m.group(1).split(","):
        if "-" in item:
            lo, hi = item.split("-", 1)
            width = len(lo)
            for i in range(int(lo), int(hi) + 1):
                out.extend(_expand_entry(f"{head}{i:0{width}d}{tail}"))
        else:
            out.extend(_expand_entry(f"{head}{item}{tail}"))
    return out


def master_address(host: str) -> str:
    """`host` when it resolves (the usual case), else the NodeAddr Slurm has for it.

    Node names need not be DNS names (NodeName=n1 NodeAddr=10.0.0.11): then the address Slurm
    itself uses to reach the node is the one that works.
    """
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        pass
    if shutil.which("scontrol"):
        out = subprocess.run(
            ["scontrol", "show", "node", "-o", host], capture_output=True, text=True, timeout=30
        )
        m = re.search(r"\bNodeAddr=(\S+)", out.stdout)
        if out.returncode == 0 and m:
            return m.group(1)
    return host


def _tasks_on_this_node(env: MutableMapping[str, str]) -> int | None:
    """Tasks on the current node from SLURM_STEP_TASKS_PER_NODE (`2(x3),1`) and SLURM_NODEID."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node_id = env.get("SLURM_NODEID")
    if not spec or node_id is None:
        return None
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    idx = int(node_id)
    return counts[idx] if 0 <= idx < len(counts) else None


def apply_slurm_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the torchrun variables from SLURM_* inside an srun step; return what was set.

    Returns {} (and changes nothing) outside an srun step. See the module docstring for the
    exact mapping and the rules about variables that are already set.
    """
    env = os.environ if environ is None else environ
    if not in_srun_step(env):
        return {}
    new: dict[str, str] = {}
    if ELASTIC_AGENT_VAR not in env:
        new["RANK"] = env["SLURM_PROCID"]
        new["WORLD_SIZE"] = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS", "1")
        new["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        local_world = _tasks_on_this_node(env)
        if local_world is not None:
            new["LOCAL_WORLD_SIZE"] = str(local_world)
        if "SLURM_NODEID" in env:
            new["NODE_RANK"] = env["SLURM_NODEID"]
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        hosts = expand_hostlist(nodelist)
        new["MASTER_ADDR"] = master_address(hosts[0]) if hosts else "127.0.0.1"
    if "MASTER_PORT" not in env:
        new["MASTER_PORT"] = str(master_port_for_job(env["SLURM_JOB_ID"]))
    if "GLOO_SOCKET_IFNAME" not in env:
        # gloo's data sockets listen on the interface that reaches the master, not on all
        iface = interface_towards(new.get("MASTER_ADDR") or env["MASTER_ADDR"])
        if iface:
            new["GLOO_SOCKET_IFNAME"] = iface
    env.update(new)
    return new


def interface_towards(address: str) -> str | None:
    """The name of the local network interface the kernel uses to reach `address` (None when
    it cannot tell): the job's own network, where the ranks talk to each other."""
    import psutil

    try:
        host = socket.gethostbyname(address)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # no packet is sent: this only picks the route
            local = s.getsockname()[0]
    except OSError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addrs):
            return name
    return None
