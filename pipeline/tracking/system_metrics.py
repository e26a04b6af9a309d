"""System metrics of the training host: CPU, memory and, where visible, GPU utilisation/memory.

    values = sample_system_metrics()    # {"system/cpu_utilization_percentage": ..., ...}

Sources in order of preference for GPUs: NVML (nvidia-ml-py), `nvidia-smi` (shipped with the
driver), then torch's own allocator counters when CUDA is already in use. torch is never
imported here: only what the process already uses is reported.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys


def sample_system_metrics() -> dict[str, float]:
    """CPU %, memory and GPU metrics as MLflow `system/*` names (finite values only)."""
    import psutil

    vm = psutil.virtual_memory()
    proc = psutil.Process()
    out = {
        "system/cpu_utilization_percentage": psutil.cpu_percent(interval=None),
        "system/system_memory_usage_megabytes": (vm.total - vm.available) / 2**20,
        "system/system_memory_usage_percentage": vm.percent,
        "system/process_memory_rss_megabytes": proc.memory_info().rss / 2**20,
    }
    out.update(gpu_metrics())
    return {k: v for k, v in out.items() if math.isfinite(v)}


def gpu_metrics() -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        import pynvml  # nvidia-ml-py, when installed

        pynvml.nvmlInit()
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out[f"system/gpu_{i}_utilization_percentage"] = float(util.gpu)
            out[f"system/gpu_{i}_memory_usage_megabytes"] = mem.used / 2**20
            out[f"system/gpu_{i}_memory_usage_percentage"] = 100.0 * mem.used / mem.total
        return out
    except Exception:  # noqa: BLE001 - no NVML bindings: try nvidia-smi, then torch
        pass
    out = nvidia_smi_metrics()
    if out:
        return out
    torch = sys.modules.get("torch")  # never import torch here: only report what is in use
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        i = torch.cuda.current_device()
        out[f"system/gpu_{i}_memory_allocated_megabytes"] = torch.cuda.memory_allocated(i) / 2**20
        out[f"system/gpu_{i}_memory_reserved_megabytes"] = torch.cuda.memory_reserved(i) / 2**20
    return out


def nvidia_smi_metrics() -> dict[str, float]:
    """GPU utilisation/memory from `nvidia-smi`, {} without it."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    cmd = [
        exe,
        "--query-gpu=index,utilization.gpu,memory.used,memory.total",
        "--format=csv,noheader,nounits",
    ]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if re.fullmatch(r"\d+(,\d+)*", visible):
        cmd.append(f"--id={visible}")
    try:
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    out = {}
    for line in text.strip().splitlines():
        try:
            idx, util, used, total = (float(x) for x in line.split(","))
        except ValueError:
            continue
        i = int(idx)
        out[f"system/gpu_{i}_utilization_percentage"] = util
        out[f"system/gpu_{i}_memory_usage_megabytes"] = used
        out[f"system/gpu_{i}_memory_usage_percentage"] = 100.0 * used / total if total else 0.0
    return out


class SystemMetricsSampler:
    """A daemon thread that hands `sample_system_metrics()` to `sink.log_system_metrics` every
    `interval` seconds until stop()."""

    def __init__(self, sink, interval: float):
        import threading

        self.sink, self.interval = sink, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rdpt-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import logging

        sample_system_metrics()  # primes psutil's cpu_percent (its first value is meaningless)
        wait = min(1.0, self.interval)  # a first sample soon, so that short runs have one too
        while not self._stop.wait(wait):
            wait = self.interval
            try:
                values = sample_system_metrics()
            except Exception as e:  # noqa: BLE001 - a missing sensor must not stop anything
                logging.getLogger("pipeline.tracking").debug("system metrics failed: %s", e)
                continue
            self.sink.log_system_metrics(values)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
