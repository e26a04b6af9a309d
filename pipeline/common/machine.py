"""What machine a figure came from, for benchmark records and stored test references.

cpu_model()     # "Intel(R) Xeon(R) Processor" (Linux /proc/cpuinfo), else platform's guess
"""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo's first "model name", else platform.processor(),
    else "unknown CPU"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
