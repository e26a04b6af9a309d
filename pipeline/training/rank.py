"""This process as one rank of a training run: process group, logging, stop signals, device.

    ctx = setup_rank(cfg, early_signals)      # ctx.rank, ctx.world, ctx.device, ctx.stop, ...

Ranks come from the environment: torch's elastic agent (`rdpt train --nproc N`), torchrun, or
srun (SLURM_* translated into the torchrun variables). A worker started by `rdpt train` dies
with its launcher, so a kill -9 of the launcher leaves no orphans.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.common.stop_signals import STOP_SIGNALS


class StopFlag:
    """Set by SIGUSR1/SIGTERM; the loop finishes its step, all ranks agree, checkpoint, exit 85."""

    def __init__(self, early: list[int] | None = None) -> None:
        self.signum: int | None = early[0] if early else None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


@dataclass
class RankContext:
    """Who this process is in the run, and where it computes."""

    cfg: object  # TrainConfig
    rank: int
    world: int
    device: torch.device
    run_dir: Path
    stop: StopFlag
    started_at: float = 0.0
    lock: object = None  # the run directory's RunLock (rank 0)
    peers: PeerFailureWatch | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_rank(cfg, early_signals: list[int] | None = None) -> RankContext:
    """Join the process group, set up logging, take over the stop signals."""
    import torch.distributed as dist

    from pipeline.common.distributed import init_process_group
    from pipeline.common.slurm_env import apply_slurm_env

    apply_slurm_env()
    init_process_group(export_env=True)  # DeepSpeed reads the rank variables itself
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = cfg.run_dir()
    lock = hold_run_dir(run_dir, rank)
    setup_logging(run_dir, rank)
    exit_with_parent()
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    stop = StopFlag(early_signals)
    peers = PeerFailureWatch(rank, world)
    return RankContext(cfg, rank, world, device, run_dir, stop, time.time(), lock, peers)


class PeerFailureWatch:
    """Every rank stops within a second when another rank of the run fails.

    A rank that fails posts its error and exit code to the process group's key-value store
    (`post`); a daemon thread of every rank polls for it and, finding another rank's error,
    prints it and ends this process with that same exit code (so whichever rank a launcher
    hears from first, the code says why: 2 for a user-facing error such as a full disk).
    Without it the other ranks would wait in their next collective until the group's timeout
    (10 minutes), saying nothing. The failing rank waits (at most `ack_timeout_s`) until every
    rank has acknowledged before it exits: a launcher that terminates the rest of the job as
    soon as one rank exits (torch's elastic agent, srun --kill-on-bad-exit) would otherwise
    kill a slow peer before it said why it stopped."""

    KEY = "rdpt/failed"
    ACK = "rdpt/failed-seen/"  # + rank

    def __init__(self, rank: int, world: int, interval_s: float = 0.5, ack_timeout_s: float = 60.0):
        self.rank = rank
        self.world = world
        self.ack_timeout_s = ack_timeout_s
        self._stop = threading.Event()
        self.store = None
        if world > 1:
            from torch.distributed.distributed_c10d import _get_default_store

            self.store = _get_default_store()
            threading.Thread(
                target=self._watch, args=(interval_s,), name="rdpt-peer-watch", daemon=True
            ).start()

    def post(self, error: str, code: int) -> None:
        """Tell every other rank that this one failed, why, and with which exit code."""
        if self.store is not None:
            import json

            record = {"rank": self.rank, "error": error, "code": code}
            with contextlib.suppress(Exception):  # the store may be gone with rank 0
                self.store.set(self.KEY, json.dumps(record))
                self.store.set(f"{self.ACK}{self.rank}", "1")  # it says why itself
                # NOTE: a hang guard, not a deadline: peers answer within `interval_s`;
                # one that died already never does, and then this waits the whole timeout.
                self.store.wait(
                    [f"{self.ACK}{r}" for r in range(self.world)],
                    datetime.timedelta(seconds=self.ack_timeout_s),
                )

    def _watch(self, interval_s: float) -> None:
        import json

        from pipeline.common.exitcodes import PEER_FAILED

        while not self._stop.wait(interval_s):
            try:
                if not self.store.check([self.KEY]):
                    continue
                failed = json.loads(self.store.get(self.KEY))
            except Exception:  # noqa: BLE001 - the store's host (rank 0) ended: stop watching;
                return  # if it crashed, this rank's next collective fails on its own
            if failed.get("rank") == self.rank or self._stop.is_set():
                return
            print(
                f"rdpt train (rank {self.rank}): stopping, rank {failed['rank']} failed: "
                f"{failed['error']}",
                file=sys.stderr,
                flush=True,
            )
            with contextlib.suppress(Exception):
                self.store.set(f"{self.ACK}{self.rank}", "1")
            logging.shutdown()
            os._exit(int(failed.get("code", PEER_FAILED)))

    def stop(self) -> None:
        self._stop.set()


def hold_run_dir(run_dir: Path, rank: int):
    """Rank 0 takes the run directory's lock (already ours when `rdpt train` started us); every
    rank learns the outcome, so a second run on the same directory stops on all its ranks
    before writing anything, with the holder named."""
    import torch.distributed as dist

    from pipeline.common.run_lock import RdptRunLockError, RunLock

    lock, error = None, None
    if rank == 0:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except RdptRunLockError as e:
            error = str(e)
    outcome = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise RdptRunLockError(outcome[0])
    return lock


def setup_logging(run_dir: Path, rank: int) -> None:
    """Rank 0 logs rdpt.* at INFO to stdout and logs/train.log; everything else warnings only."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "logs" / "train.log"))
    logging.basicConfig(
        level=logging.WARNING,
        handlers=handlers,
        force=True,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("rdpt").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def exit_with_parent() -> None:
    """A worker started by `rdpt train` dies with its launcher (no orphans after kill -9)."""
    parent = int(os.environ.get("RDPT_LAUNCHER_PID", "0"))
    if not parent:
        return

    def watch() -> None:
        while True:
            try:
                os.kill(parent, 0)
            except OSError:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="rdpt-parent-watch").start()
