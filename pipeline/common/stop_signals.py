"""The signals that ask a training run to stop cleanly (Slurm's warning before a time limit,
preemption, scancel): every rank finishes its step, checkpoints and exits 85 (REQUEUE).

Light on purpose (no torch import): `rdpt train` installs the early handler first thing, so a
signal that lands during start-up (imports, model build) is remembered instead of killing the
process before it can checkpoint."""

from __future__ import annotations

import signal
from typing import Any

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def record_early_signals() -> tuple[list[int], dict[int, Any]]:
    """Remember SIGUSR1/SIGTERM from now on, until the training loop installs its own handler.

    Returns (the signals received so far, a list that keeps growing; the handlers replaced,
    for a caller that hands the signals back to someone else later)."""
    received: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: received.append(signum))
        for sig in STOP_SIGNALS
    }
    return received, previous
