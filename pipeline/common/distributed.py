"""Process-group bootstrap shared by training, evaluation and tests.

Ranks come from the standard torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); launchers (`rdpt train --nproc`, the Slurm job script) set them.
"""

from __future__ import annotations

import datetime
import os
import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def env_rank() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the environment; (0, 1, 0) when not launched."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def launched_externally() -> bool:
    """True under srun or torchrun: this process is one rank, started by someone else."""
    from pipeline.common.slurm_env import in_srun_step

    return in_srun_step() or "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_process_group(
    backend: str | None = None, timeout_s: float = 600, export_env: bool = False
) -> None:
    """Initialise torch.distributed from the environment (idempotent).

    gloo on CPU, NCCL when CUDA is available. A process that no launcher started still gets a
    (world size 1) group on a free loopback port so DeepSpeed and megatron-core find one.
    Such a process's environment is left alone unless `export_env` (training sets it:
    DeepSpeed reads RANK/WORLD_SIZE/MASTER_* itself); evaluation or checkpoint loading called
    from a library or a test must not leave rank variables behind for later launches.
    We create the group ourselves rather than through `deepspeed.init_distributed`, which
    JIT-compiles a comm op for ~1 min on CPU.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        if export_env:  # a group made earlier in this process without exporting (eval, a test)
            _export_rank_env(dist.get_rank(), dist.get_world_size(), env_rank()[2])
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    launched = "WORLD_SIZE" in os.environ
    if not launched and not export_env:
        dist.init_process_group(
            backend=backend,
            rank=0,
            world_size=1,
            timeout=timeout,
            init_method=f"tcp://127.0.0.1:{free_port()}",
        )
        return
    rank, world, local_rank = env_rank()
    if "MASTER_PORT" not in os.environ and world > 1:
        raise RuntimeError("MASTER_PORT must be set when WORLD_SIZE > 1")
    _export_rank_env(rank, world, local_rank)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)


def _export_rank_env(rank: int, world: int, local_rank: int) -> None:
    """Set the torchrun variables DeepSpeed reads itself where nothing set them yet."""
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
