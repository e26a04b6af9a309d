"""A real Slurm cluster (munged, slurmctld, slurmd) in a temporary directory, for tests.

    def test_x(slurm_cluster):                 # 1 node "n1" (2 CPUs), partitions debug + restricted
        job = slurm_cluster.sbatch(["--wrap", "hostname"])
        info = slurm_cluster.wait_finished(job)          # scontrol record, JobState final
        assert info["JobState"] == "COMPLETED"

    def test_y(slurm_cluster_2nodes):          # nodes n1, n2, each in its own network namespace

    with start_cluster(nodes=1) as cluster:    # the same outside pytest

Everything (config, munge key and socket, state, spool,
logs) lives in a fresh temp dir; ports are picked free at start; the daemons are Popen children
in the foreground (-D/-F) and are stopped by PID at the end, also when a test fails. The 2-node
cluster runs each slurmd in its own net+uts+mount namespace (hostname n1/n2, own IP on a private
bridge, no default route); teardown deletes the bridge. slurm-wlm and munge are installed with
apt-get when missing (needs root). Client commands need `cluster.env` (SLURM_CONF, no inherited
SLURM_* variables); `cluster.activate(monkeypatch)` applies it to the test process.

Cluster facts tests may rely on: SlurmUser=root; cred_expire=5 (a requeued job restarts ~7 s
later); jobcomp/filetxt (`sacct -c`); kill_invalid_depend; a 30 s limit/signal tick; KillWait=5;
partitions `debug` (default) and `restricted` (AllowAccounts=alpha,beta); job ids start at a
random multiple of 100 below 9000 (`cluster.first_job_id`).

Pitfalls this fixture works around (found when it was written, Slurm 22.05 on Debian 12, root,
no systemd):
- munged refuses a socket directory that is not world-executable: the temp dirs are chmod 755.
- A requeued job waits cred_expire + 1 s before it may run again: cred_expire=5 (the minimum
  accepted; smaller values are silently replaced by 120).
- SLURM_RESTART_COUNT is unset on a job's first run (not 0); on requeue the -o file is
  truncated unless --open-mode=append; -o into a missing directory fails the job.
- `scancel --signal=USR1 J` without --batch does not reach the batch script; bash runs a trap
  only after its foreground child exits (use `sleep N & wait $!`).
- Without DependencyParameters=kill_invalid_depend an afterok job behind a failed one pends
  forever; `sacct -c` lists array tasks by raw id and a requeued job twice (take the last line).
- slurmctld checks time limits and --signal warnings on a fixed 30 s tick from its own start:
  a real --time/--signal test costs up to ~30 s; `scancel --signal=USR1 --batch` is instant.
- A client command sent before slurmctld listens stalls ~1 s: the fixture waits for the port.
- Two nodes: each slurmd in `unshare --net --uts --mount` held by a `sleep infinity`, a veth
  pair per node on a private bridge, hostnames n1/n2 via a bind-mounted /etc/hosts; nothing
  gets a default route, so no traffic leaves the machine.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from apt_packages import apt_install

from pipeline.common.distributed import free_port

FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}
CPUS_PER_NODE = 2

SLURM_CONF = """\
ClusterName=rdpt
FirstJobId={first_job_id}
SlurmctldHost=localhost({ctl_addr})
SlurmctldPort={ctl_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.sock,cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={d}/log/jobcomp.txt
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=bf_interval=2,sched_interval=2
DependencyParameters=kill_invalid_depend
ReturnToService=2
MailProg=/bin/true
MpiDefault=none
KillWait=5
{extra_conf}
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=restricted Nodes=ALL Default=NO MaxTime=INFINITE State=UP AllowAccounts=alpha,beta
{extra_partitions}
"""


def ensure_slurm_installed() -> None:
    """apt-get install slurm-wlm munge when slurmctld/munged are missing (root only)."""
    if all(shutil.which(c) for c in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    apt_install("slurm-wlm", "munge")


def _wait(pred, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class SlurmCluster:
    """A running test cluster; see the module docstring."""

    def __init__(self, root: Path, nodes: int, extra_conf: str = "", extra_partitions: str = ""):
        self.root = root
        self.extra_conf = extra_conf
        self.extra_partitions = extra_partitions
        self.conf = root / "slurm.conf"
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.jobs_dir = root / "jobs"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env["SLURM_CONF"] = str(self.conf)
        self._procs: list[subprocess.Popen] = []  # daemons, in start order
        self._holders: list[subprocess.Popen] = []  # namespace holders (2 nodes)
        self._node_holder: dict[str, subprocess.Popen] = {}
        self.bridge: str | None = None
        self.node_addrs: dict[str, str] = {}
        self.slurmctld: subprocess.Popen | None = None
        # NOTE: jobs derive MASTER_PORT from their id (launch/slurm_env.py); random first ids
        # keep clusters of concurrent test sessions (all in one port space) from colliding.
        self.first_job_id = random.randrange(100, 9000, 100)

    # ---------------------------------------------------------------- client helpers
    def activate(self, monkeypatch) -> None:
        """Make Slurm client commands in this test process talk to this cluster."""
        for k in list(os.environ):
            if k.startswith("SLURM_"):
                monkeypatch.delenv(k)
        monkeypatch.setenv("SLURM_CONF", str(self.conf))

    def run(
        self, *args: str, check: bool = True, timeout: float = 60, env: dict | None = None, cwd=None
    ) -> subprocess.CompletedProcess:
        out = subprocess.run(
            list(args),
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}")
        return out

    def sbatch(self, args: list[str], env: dict | None = None, cwd=None) -> int:
        """`sbatch --parsable ARGS` (output to jobs/%j.out unless ARGS set -o); the job id."""
        extra = (
            []
            if any(a.startswith(("-o", "--output")) for a in args)
            else [f"--output={self.jobs_dir}/%j.out"]
        )
        out = self.run("sbatch", "--parsable", *extra, *args, env=env, cwd=cwd)
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str] | None:
        """`scontrol show job -o ID` as a dict (first record), None when unknown."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if out.returncode != 0 or not out.stdout.strip():
            return None
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout.splitlines()[0]))

    def wait_state(self, job_id, states, timeout: float = 120) -> dict[str, str]:
        """Wait until the job's JobState is one of `states`; return its scontrol record."""
        states = {states} if isinstance(states, str) else set(states)
        last: dict = {}

        def check():
            nonlocal last
            last = self.job(job_id) or {}
            return last if last.get("JobState") in states else None

        try:
            return _wait(check, timeout, f"job {job_id} in {sorted(states)}", interval=0.2)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; last record: {last}\n{self.logs()}") from None

    def wait_finished(self, job_id, timeout: float = 120) -> dict[str, str]:
        return self.wait_state(job_id, FINAL_STATES, timeout)

    def wait_queue_empty(self, timeout: float = 120) -> None:
        _wait(lambda: not self.run("squeue", "-h").stdout.strip(), timeout, "an empty queue", 0.2)

    def sacct(self, job_id: int | str | None = None) -> list[dict[str, str]]:
        """Job-completion log records (`sacct -c`); the last line per JobID is the final one."""
        args = ["sacct", "-c", "-n", "-P", "-o", "JobID,JobName,State,ExitCode"]
        if job_id is not None:
            args += ["-j", str(job_id)]
        out = self.run(*args, check=False)
        keys = ("JobID", "JobName", "State", "ExitCode")
        return [dict(zip(keys, line.split("|"))) for line in out.stdout.splitlines() if line]

    def logs(self, tail: int = 40) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"==== {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ---------------------------------------------------------------- lifecycle
    def _popen(self, args: list[str], holder: bool = False) -> subprocess.Popen:
        log = open(self.root / "log" / f"{Path(args[0]).name}-{len(self._procs)}.stdout", "ab")
        p = subprocess.Popen(
            args,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        (self._holders if holder else self._procs).append(p)
        return p

    def start(self) -> None:
        d = self.root
        for sub in ("munge", "state", "spool", "log", "run", "jobs"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        # NOTE: munged refuses a socket directory that is not world-executable (mktemp: 0700).
        os.chmod(d, 0o755)
        os.chmod(d / "munge", 0o755)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = d / "munge" / "munge.sock"
        self._popen(
            [
                "munged",
                "-F",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--pid-file={d}/munge/munged.pid",
                f"--log-file={d}/munge/munged.log",
                f"--seed-file={d}/munge/munged.seed",
            ]
        )
        _wait(sock.exists, 20, "munged's socket")
        if len(self.nodes) == 1:
            ctl_addr = "127.0.0.1"
            node_lines = f"NodeName=n1 NodeAddr=127.0.0.1 CPUs={CPUS_PER_NODE} State=UNKNOWN"
            self.node_addrs = {"n1": "127.0.0.1"}
        else:
            net = self._make_bridge()
            ctl_addr = f"{net}.1"
            self.node_addrs = {n: f"{net}.{10 + i}" for i, n in enumerate(self.nodes, 1)}
            node_lines = "\n".join(
                f"NodeName={n} NodeAddr={a} CPUs={CPUS_PER_NODE} State=UNKNOWN"
                for n, a in self.node_addrs.items()
            )
            hosts = ["127.0.0.1 localhost", f"{ctl_addr} ctl"]
            hosts += [f"{a} {n}" for n, a in self.node_addrs.items()]
            (d / "hosts").write_text("\n".join(hosts) + "\n")
        self.ctl_port = free_port()
        self.conf.write_text(
            SLURM_CONF.format(
                d=d,
                ctl_addr=ctl_addr,
                ctl_port=self.ctl_port,
                slurmd_port=free_port(),
                node_lines=node_lines,
                first_job_id=self.first_job_id,
                extra_conf=self.extra_conf,
                extra_partitions=self.extra_partitions,
            )
        )
        self.slurmctld = self._popen(["slurmctld", "-D", "-f", str(self.conf)])

        # NOTE: a client call before slurmctld listens stalls ~1 s in a retry: connect first.
        def listening():
            if self.slurmctld.poll() is not None:
                raise RuntimeError(
                    f"slurmctld exited with {self.slurmctld.returncode}\n{self.logs()}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((ctl_addr, self.ctl_port), timeout=0.5),
            ):
                return True
            return False

        _wait(listening, 30, "slurmctld to listen")
        if len(self.nodes) == 1:
            self._popen(["slurmd", "-D", "-f", str(self.conf), "-N", "n1"])
        else:
            for n in self.nodes:
                self._start_node_namespace(n)
        want = f"idle {len(self.nodes)}"
        try:
            _wait(
                lambda: (
                    self.run(
                        "sinfo", "-h", "-p", "debug", "-o", "%T %D", check=False
                    ).stdout.strip()
                    == want
                ),
                60,
                "idle nodes",
                0.1,
            )
        except TimeoutError:
            raise RuntimeError(f"nodes never became idle\n{self.logs()}") from None

    def _make_bridge(self) -> str:
        routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
        free = [x for x in range(1, 255) if f"10.213.{x}." not in routes]
        net = f"10.213.{random.choice(free)}"
        suffix = self.root.name.rsplit(".", 1)[-1][-6:]
        self.bridge = f"rdbr{suffix}"
        self._veth_prefix = f"v{suffix}"
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{net}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return net

    def _start_node_namespace(self, node: str) -> None:
        holder = self._popen(
            ["unshare", "--net", "--uts", "--mount", "sleep", "infinity"], holder=True
        )
        own = os.readlink("/proc/self/ns/net")
        _wait(lambda: os.readlink(f"/proc/{holder.pid}/ns/net") != own, 10, "a new namespace", 0.01)
        self._node_holder[node] = holder
        veth = self.veth(node)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", str(holder.pid))
        _ip("link", "set", veth, "master", self.bridge, "up")
        addr = self.node_addrs[node]
        setup = (
            f"hostname {node} && ip link set lo up && ip addr add {addr}/24 dev eth0 "
            f"&& ip link set eth0 up && mount --bind {self.root}/hosts /etc/hosts"
        )
        subprocess.run(
            ["nsenter", "-t", str(holder.pid), "-n", "-u", "-m", "sh", "-c", setup],
            check=True,
            capture_output=True,
            text=True,
        )
        self.start_slurmd(node)

    def veth(self, node: str) -> str:
        """The host side of `node`'s network cable (2-node clusters)."""
        return f"{self._veth_prefix}{node[1:]}"

    def start_slurmd(self, node: str) -> None:
        """Start `node`'s slurmd inside its namespace (at start, or after `power_off`)."""
        holder = self._node_holder[node]
        # nsenter execs slurmd, so this Popen holds slurmd's own PID.
        self._popen(
            [
                "nsenter",
                "-t",
                str(holder.pid),
                "-n",
                "-u",
                "-m",
                "slurmd",
                "-D",
                "-f",
                str(self.conf),
                "-N",
                node,
            ]
        )

    def power_off(self, node: str) -> list[int]:
        """`node` dies as a powered-off machine would: its cable is pulled first (no FIN or RST
        reaches anyone), then every process in its namespace (slurmd, slurmstepd, job tasks) is
        SIGKILLed. Returns the killed PIDs. `power_on` brings it back."""
        holder = self._node_holder[node]
        _ip("link", "set", self.veth(node), "down")
        ns = os.readlink(f"/proc/{holder.pid}/ns/net")
        killed = []
        for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()):
            if pid == holder.pid:
                continue
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/ns/net") == ns:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        for p in self._procs:  # reap our own slurmd child
            if p.pid in killed:
                p.wait(timeout=10)
        return killed

    def power_on(self, node: str) -> None:
        """Reconnect `node` and start its slurmd again (a reboot; ReturnToService=2 lets it
        rejoin on registration)."""
        _ip("link", "set", self.veth(node), "up")
        self.start_slurmd(node)

    def stop(self) -> None:
        """Cancel jobs, stop every daemon and holder by PID, delete the bridge. Idempotent."""
        ctl_alive = self.slurmctld is not None and self.slurmctld.poll() is None
        if ctl_alive:  # NOTE: clients against a dead controller retry for many seconds
            with contextlib.suppress(Exception):
                self.run("scancel", "--user=root", check=False, timeout=20)
                spool = self.root / "spool"
                _wait(
                    lambda: (
                        not self.run("squeue", "-h", check=False, timeout=20).stdout.strip()
                        and not any(p.is_socket() for p in spool.rglob("*"))
                    ),
                    30,
                    "jobs to end",
                    0.1,
                )
        for group in (list(reversed(self._procs)), self._holders):
            for p in group:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.send_signal(signal.SIGTERM)
            for p in group:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        self._procs.clear()
        self._holders.clear()
        if self.bridge:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
            self.bridge = None


@contextlib.contextmanager
def start_cluster(
    nodes: int = 1, keep_dir: bool = False, extra_conf: str = "", extra_partitions: str = ""
):
    """A running cluster of 1 or 2 nodes for the duration of the block; `extra_conf` lines
    go into slurm.conf before the nodes, `extra_partitions` after the two standard ones."""
    ensure_slurm_installed()
    root = Path(tempfile.mkdtemp(prefix="rdpt-slurm."))
    cluster = SlurmCluster(root, nodes, extra_conf, extra_partitions)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if not keep_dir:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster():
    """One node `n1` (2 CPUs) in the root network namespace; shared by the session's tests."""
    with start_cluster(nodes=1) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def slurm_cluster_2nodes():
    """Two nodes `n1`, `n2` (2 CPUs each), each slurmd in its own network namespace."""
    with start_cluster(nodes=2) as cluster:
        yield cluster
