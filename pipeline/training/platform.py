"""What the training engine's set-up depends on in the machine, as a plain value.

    platform = Platform.detect()                  # this process: CUDA or CPU, prebuilt ops
    platform = Platform("cuda", fused_adam_prebuilt=False)   # a GPU machine without nvcc
    deepspeed_config(cfg, dims, platform)         # the engine config for that machine

Every choice that differs between a GPU and a CPU run (optimizer implementation, precision,
overlapped communication) takes a `Platform` instead of asking torch itself, so the choice for
a machine this process is not running on can be computed and checked (the CPU tests check
what a CUDA machine without a compiler would get).
"""

from __future__ import annotations

from dataclasses import dataclass


def deepspeed_op_prebuilt(name: str) -> bool:
    """True when DeepSpeed was installed with op `name` compiled (DS_BUILD_OPS=1 or
    DS_BUILD_<OP>=1); such an op loads without a JIT build (no nvcc, no minutes at start-up).

    NOTE: reads the record DeepSpeed's setup.py writes (git_version_info_installed.py) without
    importing the deepspeed package, whose import probes accelerators and prints to stdout
    (which `rdpt train --dry-run` keeps for the config alone)."""
    import importlib.util
    import runpy
    from pathlib import Path

    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        return False
    record = Path(list(spec.submodule_search_locations)[0]) / "git_version_info_installed.py"
    if not record.is_file():
        return False
    installed = runpy.run_path(str(record)).get("installed_ops", {})
    return bool(installed.get(name, False))


@dataclass(frozen=True)
class Platform:
    device_type: str
    """'cuda' or 'cpu': where the model computes."""
    fused_adam_prebuilt: bool = False
    """DeepSpeed's fused Adam op is already compiled (using it costs no JIT build)."""

    @property
    def cuda(self) -> bool:
        return self.device_type == "cuda"

    @classmethod
    def detect(cls) -> Platform:
        """This process's machine."""
        import torch

        return cls(
            device_type="cuda" if torch.cuda.is_available() else "cpu",
            fused_adam_prebuilt=deepspeed_op_prebuilt("fused_adam"),
        )
