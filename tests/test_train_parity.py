"""The whole training step (`pipeline.train.main`: real megatron-core model, real DeepSpeed
engines, real WebDataset loader, gloo on CPU, fp32) is independent of the parallel layout:
2 processes under ZeRO 1, 2 and 3 reproduce 1 process; TP2 x DP1 agrees with TP1 x DP2.
Also: an injected non-finite step is skipped (weights untouched) and counted, and N in a row
stop the run with exit 86 and a checkpoint. One spawn per world size; engines are rebuilt
inside it (sharing the process group keeps this cheap)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from distributed import run_distributed

STEPS = 4


def _overrides(data: str, run_dir: Path, extra: list[str]) -> list[str]:
    return [
        f"data.path={data}",
        f"run.dir={run_dir}",
        f"train.max_steps={STEPS}",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.log_interval=1",
        "train.precision=fp32",
        "optim.lr=3e-3",
        "optim.warmup_steps=1",
        f"eval.interval={STEPS}",
        "eval.recurrences=[1,3]",
        "eval.max_sequences=8",
        "eval.batch_size=2",
        "checkpoint.interval=100",
        "tracking.enabled=false",
        "recurrence.mean=3",
        "recurrence.backprop_depth=2",
        "recurrence.max_r=4",
        "model.vocab_size=512",
        *extra,
    ]


def _curve(run_dir: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["step"], {}).update(rec)
    return out


def train_runs(rank, world, data: str, tmp: str, runs: dict[str, list[str]]):
    """Run pipeline.train.main once per named override list, in these processes."""
    from pipeline.train import main
    from pipeline.training.config import load_train_config

    codes = {}
    for name, extra in runs.items():
        cfg = load_train_config(
            Path(__file__).resolve().parent.parent / "configs/train/tiny.yaml",
            _overrides(data, Path(tmp) / name, extra),
        )
        codes[name] = main(cfg, resume="none")
    return codes


SKIP_CASES = [  # name, what is made non-finite, layout
    ("inf_loss_zero1", "inf_loss", ["parallel.zero_stage=1"]),
    ("inf_grad_zero0", "inf_grad", ["parallel.zero_stage=0"]),
    ("inf_grad_zero3", "inf_grad", ["parallel.zero_stage=3"]),
    ("inf_loss_tp2", "inf_loss", ["parallel.zero_stage=1", "parallel.tp=2"]),
]


def _ds_weights(ckpt: Path) -> dict:
    """The fp32 master weights a checkpoint restores (any ZeRO stage, any TP size): the
    optimizer's flat fp32 partitions (ZeRO >= 1) or the module (ZeRO-0), per file."""
    from pipeline.training.checkpoint import weights_only_loads

    out = {}
    for f in sorted((ckpt / "ds").glob("*.pt")):
        with weights_only_loads():
            blob = torch.load(f, map_location="cpu", weights_only=True)
        if "optim_states" in f.name:
            osd = blob["optimizer_state_dict"]
            groups = osd.get("single_partition_of_fp32_groups") or osd.get("fp32_flat_groups")
            for i, t in enumerate(groups):
                out[f"{f.name}/{i}"] = t
        elif "model_states" in f.name and blob.get("module"):
            for k, t in blob["module"].items():
                if torch.is_tensor(t):
                    out[f"{f.name}/{k}"] = t
    return out


def _weights(ckpt: Path):
    from pipeline.training.checkpoint import consolidated_state_dict

    return consolidated_state_dict(ckpt)


def test_two_processes_reproduce_one_under_zero_and_tp(tiny_dataset, tmp_path):
    env = {"OMP_NUM_THREADS": "1"}
    ref = run_distributed(
        train_runs,
        1,
        args=(str(tiny_dataset), str(tmp_path), {"ref": ["parallel.zero_stage=0"]}),
        env=env,
    )
    assert ref == [{"ref": 0}]
    two = {
        "zero1": ["parallel.zero_stage=1"],
        "zero2": ["parallel.zero_stage=2", "checkpoint.interval=3"],
        "zero3": ["parallel.zero_stage=3"],
        "tp2": ["parallel.zero_stage=1", "parallel.tp=2"],
        "nan_skip": ["parallel.zero_stage=2", f"debug.nan_at_steps=[{STEPS - 1}]"],
        "nan_abort": [
            "parallel.zero_stage=0",
            "debug.nan_at_steps=[1,2]",
            "train.max_nonfinite_steps=2",
        ],
        # +Inf loss, Inf gradients of a finite loss, NaN: under every stage and with TP
        **{
            name: [*layout, f"debug.{kind}_at_steps=[{STEPS - 1}]", "checkpoint.interval=3"]
            for name, kind, layout in SKIP_CASES
        },
    }
    codes = run_distributed(train_runs, 2, args=(str(tiny_dataset), str(tmp_path), two), env=env)
    assert codes[0] == {**{k: 0 for k in two}, "nan_abort": 86}

    reference = _curve(tmp_path / "ref")
    assert sorted(reference) == list(range(1, STEPS + 1))
    losses = [reference[s]["train/loss"] for s in range(1, STEPS + 1)]
    assert losses[-1] < losses[0]  # it trains
    for name in ("zero1", "zero2", "zero3", "tp2"):
        curve = _curve(tmp_path / name)
        for s in range(1, STEPS + 1):
            assert curve[s]["train/loss"] == pytest.approx(reference[s]["train/loss"], abs=1e-5), (
                name,
                s,
            )
            assert curve[s]["train/grad_norm"] == pytest.approx(
                reference[s]["train/grad_norm"], rel=1e-4
            ), (name, s)
            assert curve[s]["train/r"] == reference[s]["train/r"]
        # validation (random initial state seeded per global sample id) is layout-independent
        for key in ("val/loss_r1", "val/loss_r3", "val/state_cosine"):
            assert curve[STEPS][key] == pytest.approx(reference[STEPS][key], abs=1e-5), (name, key)
    assert reference[STEPS]["val/loss_r1"] != reference[STEPS]["val/loss_r3"]
    tp2, dp2 = _curve(tmp_path / "tp2"), _curve(tmp_path / "zero1")
    assert all(abs(tp2[s]["train/loss"] - dp2[s]["train/loss"]) < 1e-5 for s in tp2)

    # injected NaN at the last step: skipped and counted, the weights are those of the step before
    skip = _curve(tmp_path / "nan_skip")
    assert skip[STEPS]["train/skipped_steps"] == 1 and "train/loss" not in skip[STEPS]
    assert skip[STEPS - 1]["train/loss"] == pytest.approx(
        reference[STEPS - 1]["train/loss"], abs=1e-5
    )
    before = _weights(tmp_path / "zero2/checkpoints/step-00000003")
    after = _weights(tmp_path / "nan_skip/checkpoints/step-00000004")
    assert before.keys() == after.keys()
    for k in before:
        assert (before[k] - after[k]).abs().max() < 1e-6, k

    # two non-finite steps in a row (ZeRO-0 path): exit 86 with the last good state saved
    abort_dir = tmp_path / "nan_abort"
    state = json.loads((abort_dir / "checkpoints/step-00000003/trainer_state.json").read_text())
    assert state["skipped_steps"] == 2 and state["step"] == 3
    assert not (abort_dir / "COMPLETED").exists()
    assert all(
        math.isfinite(float(v.abs().max()))
        for v in _weights(abort_dir / "checkpoints/step-00000003").values()
    )
    abort = _curve(abort_dir)
    assert abort[1]["train/loss"] == pytest.approx(reference[1]["train/loss"], abs=1e-5)
    log = (abort_dir / "logs/train.log").read_text()
    assert "2 non-finite steps in a row" in log

    # every skip case: counted, and the weights after the skipped step are those before it
    for name, kind, _ in SKIP_CASES:
        curve = _curve(tmp_path / name)
        assert curve[STEPS]["train/skipped_steps"] == 1, name
        assert ("train/loss" in curve[STEPS]) == (kind == "inf_grad"), name  # finite loss kept
        before = _ds_weights(tmp_path / name / "checkpoints/step-00000003")
        after = _ds_weights(tmp_path / name / "checkpoints/step-00000004")
        assert before.keys() == after.keys() and before, name
        for k in before:
            assert torch.equal(before[k], after[k]), (name, k)
