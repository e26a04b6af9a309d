"""Model FLOPs utilisation: one definition for training, bench/ and `rdpt runs compare`.

    peak = peak_flops("NVIDIA H200")                 # 989e12 (bf16 dense, per device)
    peak = peak_flops("NVIDIA H200", override_tflops=900)   # a config override wins
    u = mfu(model_flops, seconds, devices=8, peak_flops_per_device=peak)

`model_flops` is what the model must compute (pipeline/model/flops.py: every matmul, no credit
for recompute), summed step by step with each step's own r. MFU is that sum over the wall time
of the same steps, over the devices' combined dense bf16 peak. The peak comes from the table
below by device name (the first pattern contained in the name wins, so the more specific
names come first), or from the config (`train.peak_tflops`) for a device not listed.
"""

from __future__ import annotations

# Dense (no sparsity) bf16 tensor-core peak per device as torch names it, in TFLOP/s. MI250X:
# torch sees each of its two dies (GCDs) as one device, so the figure is half the package's.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # SXM (and GH200)
    ("A100", 312.0),
    ("B200", 2250.0),
    ("MI250X", 191.5),
    ("MI300X", 1307.0),
)


def peak_flops(device_name: str | None, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the override (TFLOP/s) if given, else the table entry whose
    pattern the device name contains, else None (MFU is then not reported)."""
    if override_tflops is not None:
        return float(override_tflops) * 1e12
    if not device_name:
        return None
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if pattern.lower() in device_name.lower():
            return tflops * 1e12
    return None


def mfu(model_flops: float, seconds: float, devices: int, peak_flops_per_device: float) -> float:
    """Fraction of the peak the model FLOPs of `seconds` of wall time on `devices` devices
    reached (0..1)."""
    if seconds <= 0 or devices < 1 or peak_flops_per_device <= 0:
        raise ValueError(
            f"mfu needs seconds > 0, devices >= 1 and a positive peak; got {seconds}, "
            f"{devices}, {peak_flops_per_device}"
        )
    return model_flops / seconds / devices / peak_flops_per_device
