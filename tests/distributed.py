"""Run a function in N local processes joined by a gloo process group (CPU).

    results = run_distributed(my_fn, world_size=2, args=(x,))

`my_fn(rank, world_size, *args)` must be defined at module level (processes are spawned).
Each rank's return value comes back in rank order; an exception in any rank fails the call
with that rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import traceback

import torch.multiprocessing as mp

from pipeline.common.distributed import free_port


def _worker(rank, world_size, port, fn, args, queue, env):
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        dist.barrier()
        # NOTE: plain pickle bytes, not the objects: a tensor put on a multiprocessing queue is
        # shared through a socket of this process, which may have exited by the time the
        # parent reads it (FileNotFoundError in the parent under load).
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # report any failure to the parent with its traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn, world_size: int = 2, args: tuple = (), timeout: float = 600, env: dict | None = None
) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, env or {}))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout)
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
