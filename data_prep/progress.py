"""Progress of the encode phase: a tqdm bar on a terminal (documents, MB/s, tokens/s, ETA),
plain periodic log lines otherwise (batch jobs, CI, pipes)."""

from __future__ import annotations

import sys
import time


def say(msg: str) -> None:
    """A status line on stderr (stdout carries the summary table)."""
    print(msg, file=sys.stderr, flush=True)


class EncodeProgress:
    def __init__(
        self,
        total_bytes: int,
        label: str = "encode",
        interval_s: float = 10.0,
        tty: bool | None = None,
    ):
        self.total = max(total_bytes, 1)
        self.label = label
        self.interval = interval_s
        self.t0 = time.monotonic()
        self.last_log = self.t0
        self.bytes = self.docs = self.tokens = self.chunks = 0
        self.planned = 0  # input bytes of the chunks done (the bar's unit)
        tty = sys.stderr.isatty() if tty is None else tty
        self.bar = None
        if tty:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=label,
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def update(self, summary: dict) -> None:
        self.bytes += summary["bytes"]
        self.planned += summary.get("planned_bytes", summary["bytes"])
        self.docs += summary["documents"]
        self.tokens += summary["tokens"]
        self.chunks += 1
        now = time.monotonic()
        rate = self.tokens / max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(summary.get("planned_bytes", summary["bytes"]))
            self.bar.set_postfix_str(f"{self.docs} docs, {rate / 1e6:.2f} M tok/s", refresh=False)
        elif now - self.last_log >= self.interval:
            self.last_log = now
            done = min(self.planned / self.total, 1.0)
            elapsed = now - self.t0
            eta = elapsed * (1 - done) / done if done > 0 else float("nan")
            say(
                f"{self.label}: {self.planned / 2**20:.1f}/{self.total / 2**20:.1f} MiB "
                f"({done:.0%}), {self.docs} docs, {self.planned / 2**20 / elapsed:.1f} MiB/s, "
                f"{rate / 1e6:.2f} M tok/s, ETA {eta:.0f} s"
            )

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return time.monotonic() - self.t0
