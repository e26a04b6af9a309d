"""pipeline.common.slurm_env: torchrun variables from SLURM_* (unit rules + real srun steps)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from pipeline.common.slurm_env import (
    apply_slurm_env,
    expand_hostlist,
    expand_hostlist_python,
    master_address,
    master_port_for_job,
)

STEP = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
}

PRINT_ENV = textwrap.dedent(
    """
    import json, os, socket
    from pipeline.common.slurm_env import apply_slurm_env
    new = apply_slurm_env()
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    print(json.dumps({"host": socket.gethostname(), "job": os.environ["SLURM_JOB_ID"],
                      "new": sorted(new), **{k: os.environ.get(k) for k in keys}}))
    """
)

ALL_REDUCE = textwrap.dedent(
    """
    import json, os, socket
    import torch, torch.distributed as dist
    from pipeline.common.slurm_env import apply_slurm_env
    from pipeline.common.distributed import init_process_group
    apply_slurm_env()
    init_process_group(backend="gloo", timeout_s=60)
    r = dist.get_rank()
    t = torch.tensor([float(r + 1)])
    dist.all_reduce(t)
    print(json.dumps({"host": socket.gethostname(), "rank": r, "world": dist.get_world_size(),
                      "sum": t.item(), "master": os.environ["MASTER_ADDR"],
                      "port": os.environ["MASTER_PORT"],
                      "ifname": os.environ.get("GLOO_SOCKET_IFNAME")}), flush=True)
    # NOTE: barrier before destroy: without it gloo sometimes aborts rank 0 at exit.
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_mapping_inside_a_step():
    env = dict(STEP)
    new = apply_slurm_env(env)
    assert env["RANK"] == "3" and env["WORLD_SIZE"] == "4" and env["LOCAL_RANK"] == "1"
    assert env["LOCAL_WORLD_SIZE"] == "2" and env["NODE_RANK"] == "1"
    assert env["MASTER_ADDR"] == "gpu07"
    assert env["MASTER_PORT"] == str(master_port_for_job(4242)) == "24242"
    assert set(new) == {
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "NODE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    }


def test_noop_outside_a_step():
    batch_shell = {k: v for k, v in STEP.items() if k != "SLURM_STEP_ID"}  # the batch script
    before = dict(batch_shell)
    assert apply_slurm_env(batch_shell) == {} and batch_shell == before
    assert apply_slurm_env({"HOME": "/root"}) == {}


def test_torchrun_variables_win():
    env = {
        **STEP,
        "RANK": "0",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "0",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RUN_ID": "job-4242",
    }
    new = apply_slurm_env(env)
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "16" and env["MASTER_PORT"] == "29500"
    assert set(new) == {"MASTER_ADDR"}  # only what was missing


def test_stale_rank_variables_from_the_submitting_shell_lose():
    # sbatch exports the submitter's environment: RANK=0 WORLD_SIZE=1 left over from a local
    # run must not make every task rank 0 of 1.
    env = {**STEP, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    apply_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1")


def test_gloo_listens_on_the_interface_towards_the_master_unless_told_otherwise():
    env = {**STEP, "MASTER_ADDR": "127.0.0.1"}
    apply_slurm_env(env)
    assert env["GLOO_SOCKET_IFNAME"] == "lo"
    env = {**STEP, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "ib0"}
    apply_slurm_env(env)
    assert env["GLOO_SOCKET_IFNAME"] == "ib0"
    assert "GLOO_SOCKET_IFNAME" not in apply_slurm_env(dict(STEP))  # gpu07 does not resolve


def test_port_is_per_job_and_in_range():
    ports = {master_port_for_job(j) for j in range(1, 5000)}
    assert len(ports) == 4999 and min(ports) >= 20000 and max(ports) < 30000


@pytest.mark.parametrize(
    "nodelist",
    ["n1", "n[1-3]", "gpu-[001-003,010],cpu7", "a[1-2]-b[3-4]", "node[08-11],x[1,3]"],
)
def test_hostlist_python_matches_scontrol(slurm_cluster, nodelist):
    ref = slurm_cluster.run("scontrol", "show", "hostnames", nodelist).stdout.split()
    assert expand_hostlist_python(nodelist) == ref
    assert ref[0] in expand_hostlist(nodelist)


def test_real_srun_one_node(slurm_cluster, tmp_path, monkeypatch):
    slurm_cluster.activate(monkeypatch)  # for master_address() below
    script = tmp_path / "print_env.py"
    script.write_text(PRINT_ENV)
    out = slurm_cluster.run("srun", "-n2", sys.executable, str(script), cwd=tmp_path)
    rows = sorted((json.loads(line) for line in out.stdout.splitlines()), key=lambda r: r["RANK"])
    assert [r["RANK"] for r in rows] == ["0", "1"]
    assert [r["LOCAL_RANK"] for r in rows] == ["0", "1"]
    assert {r["WORLD_SIZE"] for r in rows} == {"2"}
    assert {r["LOCAL_WORLD_SIZE"] for r in rows} == {"2"}
    # node name n1 is not a DNS name on this machine: its NodeAddr (127.0.0.1) is used
    assert {r["MASTER_ADDR"] for r in rows} == {master_address("n1")}
    assert master_address("n1") in ("n1", "127.0.0.1")
    job = int(rows[0]["job"])
    assert {r["MASTER_PORT"] for r in rows} == {str(master_port_for_job(job))}
    # a torchrun-style launcher inside the step already set the rank variables: left alone
    out = slurm_cluster.run(
        "srun",
        "-n1",
        "--export=ALL,RANK=7,WORLD_SIZE=9,LOCAL_RANK=2,TORCHELASTIC_RUN_ID=x",
        sys.executable,
        str(script),
        cwd=tmp_path,
    )
    row = json.loads(out.stdout)
    assert (row["RANK"], row["WORLD_SIZE"], row["LOCAL_RANK"]) == ("7", "9", "2")
    assert "RANK" not in row["new"] and "MASTER_PORT" in row["new"]
    # stale rank variables exported from the submitting shell: Slurm's ranks win
    out = slurm_cluster.run(
        "srun",
        "-n2",
        "--export=ALL,RANK=0,WORLD_SIZE=1,LOCAL_RANK=0",
        sys.executable,
        str(script),
        cwd=tmp_path,
    )
    rows = sorted((json.loads(line) for line in out.stdout.splitlines()), key=lambda r: r["RANK"])
    assert [(r["RANK"], r["WORLD_SIZE"]) for r in rows] == [("0", "2"), ("1", "2")]


def test_gloo_all_reduce_across_two_node_namespaces(slurm_cluster_2nodes, tmp_path):
    cluster = slurm_cluster_2nodes
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    job = cluster.sbatch(
        [
            "-N2",
            "--ntasks-per-node=1",
            f"--output={tmp_path}/ar-%j.out",
            f"--chdir={tmp_path}",
            "--export=ALL,OMP_NUM_THREADS=1",
            "--wrap",
            f"srun --kill-on-bad-exit=1 {sys.executable} {script}",
        ]
    )
    info = cluster.wait_finished(job, timeout=180)
    text = (tmp_path / f"ar-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", text
    rows = sorted(
        (json.loads(line) for line in text.splitlines() if line.startswith("{")),
        key=lambda r: r["rank"],
    )
    assert [r["host"] for r in rows] == ["n1", "n2"], text  # one process per node namespace
    assert [r["sum"] for r in rows] == [3.0, 3.0] and {r["world"] for r in rows} == {2}
    assert {r["master"] for r in rows} == {"n1"}
    assert {r["port"] for r in rows} == {str(master_port_for_job(job))}
    # gloo listens on each node's interface of the job network (the namespace's eth0), not on *
    assert {r["ifname"] for r in rows} == {"eth0"}
