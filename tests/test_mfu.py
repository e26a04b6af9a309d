"""MFU: the device peak table, and training's train/mfu over steps whose r varies, replayed
with a recorded sequence of r and a scripted clock and compared with a count by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flops_by_hand import hand_flops_from_model_yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA B200", 2250.0),
        ("AMD Instinct MI250X", 191.5),
        ("AMD Instinct MI300X", 1307.0),
    ],
)
def test_peak_table_by_device_name(name, tflops):
    from pipeline.common.mfu import peak_flops

    assert peak_flops(name) == tflops * 1e12


def test_unknown_device_has_no_peak_and_the_config_override_wins():
    from pipeline.common.mfu import peak_flops

    assert peak_flops("Some Future GPU") is None
    assert peak_flops(None) is None
    assert peak_flops("NVIDIA H100 80GB HBM3", override_tflops=500) == 500e12
    assert peak_flops("Some Future GPU", override_tflops=123.5) == 123.5e12


class ScriptedClock:
    """A clock the test moves by hand: the meter reads time only from it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _hand_flops_per_token(r: int, k: int) -> int:
    # the tiny model (configs/model/tiny.yaml) at vocabulary 512, sequence 64
    return hand_flops_from_model_yaml(REPO / "configs/model/tiny.yaml", seq=64, r=r, k=k)


def test_logged_mfu_sums_each_steps_own_r(tmp_path):
    from pipeline.tracking.logger import RunTracker
    from pipeline.training.config import load_train_config
    from pipeline.training.metrics import StepMeter
    from pipeline.training.state import TrainerState
    from pipeline.training.step import StepResult

    seq_len, batch, world, peak_tflops = 64, 8, 2, 0.25
    cfg = load_train_config(
        None,
        [
            f"model={REPO / 'configs/model/tiny.yaml'}",
            "model.vocab_size=512",
            f"train.global_batch_size={batch}",
            f"train.micro_batch_size={batch // world}",
            "train.log_interval=3",
            "train.max_steps=6",
            f"train.peak_tflops={peak_tflops}",
        ],
    )
    tracker = RunTracker(tmp_path, None, enabled=False, system_metrics_interval=0)
    clock = ScriptedClock()
    meter = StepMeter(cfg, seq_len, world, tracker, clock=clock)
    # a recorded sequence of (r, k) with the seconds each step took
    recorded = [(5, 2, 0.5), (1, 1, 0.25), (13, 2, 1.0), (3, 2, 0.5), (20, 8, 2.0), (2, 2, 0.25)]
    state = TrainerState()
    ok = StepResult(loss=1.0, nonfinite=False, stop_requested=False, grad_norm=1.0)
    for r, k, seconds in recorded:
        clock.now += seconds
        state.record(ok, batch * seq_len)
        meter.record(state.step, ok, r, r - min(k, r), min(k, r), 1e-3, state)
    assert tracker.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {x["step"]: x for x in lines if "train/mfu" in x}
    assert sorted(logged) == [3, 6]

    tokens = batch * seq_len
    for last, window in ((3, recorded[:3]), (6, recorded[3:])):
        flops = sum(_hand_flops_per_token(r, k) * tokens for r, k, _ in window)
        seconds = sum(s for _, _, s in window)
        expected = flops / seconds / world / (peak_tflops * 1e12)
        assert logged[last]["train/mfu"] == pytest.approx(expected, rel=1e-12)
        assert logged[last]["train/model_tflops"] == pytest.approx(
            flops / seconds / world / 1e12, rel=1e-12
        )
        # the old way (the last step's r times the window's throughput) is far off here
        r_last, k_last, _ = window[-1]
        naive = _hand_flops_per_token(r_last, k_last) * tokens * len(window) / seconds / world
        assert abs(naive / (peak_tflops * 1e12) - expected) > 0.1 * expected
