"""Start N local ranks with torchrun semantics (torch.distributed's elastic agent).

    code = launch_local(pipeline.train.main, (cfg, "auto"), nproc=2, run_dir=run_dir)

- One spawned worker per rank calls `fn(*args)` (the same function a rank started by srun or
  torchrun calls in its own process, with the same already-resolved config: one entry path)
  with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set by the agent (c10d rendezvous
  on 127.0.0.1, like `torchrun --standalone`); gloo on CPU and NCCL on GPU are chosen by `fn`.
  A non-zero int returned by `fn` becomes the worker's exit code.
- OMP_NUM_THREADS = cores // nproc unless the user set it (N ranks must not fight over cores).
- SIGTERM/SIGINT/SIGUSR1 sent to the launcher are forwarded to every worker (the agent does it),
  which finish their step, checkpoint and exit 85; workers die with the launcher (kill -9).
- The exit code is the workers' meaningful one: 0, 2 (bad input), 85 (requeue), 86 (aborted
  on non-finite steps), else 1.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

from pipeline.common import exitcodes

MEANINGFUL = (exitcodes.USER_ERROR, exitcodes.REQUEUE, exitcodes.NONFINITE_ABORT)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(nproc: int) -> int:
    return max(1, usable_cores() // max(1, nproc))


def exit_with_result(fn, *args) -> None:
    """A worker's body: the code `fn` returns is the process's exit code; an RdptError (bad
    input, a full disk, a refused checkpoint) is printed without a traceback and exits 2,
    as the same error does in a rank started by srun."""
    from pipeline.common.errors import RdptError

    try:
        code = fn(*args)
    except RdptError as e:
        if not getattr(e, "reported", False):  # training reports its own (pipeline/train.py)
            rank = os.environ.get("RANK", "?")
            print(f"rdpt train (rank {rank}): error: {e}", file=sys.stderr, flush=True)
        sys.exit(exitcodes.USER_ERROR)
    if code:
        sys.exit(int(code))


def launch_local(fn, args: tuple, *, nproc: int, run_dir: str | os.PathLike) -> int:
    """Run `fn(*args)` in `nproc` workers on this machine under the elastic agent; return the
    exit code that matters (see the module docstring). `fn` and `args` must be picklable."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    run_dir = Path(run_dir)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))
    os.environ["RDPT_LAUNCHER_PID"] = str(os.getpid())
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"rdpt-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
        signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        logs_specs=DefaultLogsSpecs(log_dir=str(run_dir / "logs" / "elastic")),
    )
    t0 = time.time()
    try:
        elastic_launch(config, entrypoint=exit_with_result)(fn, *args)
        return exitcodes.OK
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in e.failures.items()}
        for rank in sorted(codes):
            if codes[rank] in MEANINGFUL:
                return codes[rank]
        print(
            f"rdpt train: worker(s) failed with exit codes {codes}; see {run_dir / 'logs'}",
            file=sys.stderr,
        )
        return 1
    except SignalException as e:
        recorded = exitcodes.recorded_exit(run_dir, t0)
        print(
            f"rdpt train: got signal {e.sigval.name}; workers stopped"
            + (f" with code {recorded}" if recorded is not None else ""),
            file=sys.stderr,
        )
        return recorded if recorded is not None else 128 + int(e.sigval)
