"""The published Huginn recipe: init by unrolled depth, the warmup-stable-decay schedule of
configs/train/huginn-0125.yaml, and its memory estimate under `rdpt train --dry-run`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_model_reference import tp1  # noqa: F401  (fixture)

from pipeline.model import ModelConfig, build_model
from pipeline.training.config import load_train_config

REPO = Path(__file__).resolve().parent.parent
HUGINN = REPO / "configs" / "train" / "huginn-0125.yaml"


def huginn_shaped(depth: str, rbar: float | None) -> ModelConfig:
    """huginn-3.5b's layer counts (2 + 4 x r + 2), head_dim 96 as published, small width."""
    return ModelConfig(
        vocab_size=256,
        hidden_size=384,
        num_heads=4,
        ffn_hidden_size=1024,
        n_prelude=2,
        n_core=4,
        n_coda=2,
        max_seq_len=32,
        attention_backend="math",
        init={"depth": depth, "mean_recurrence": rbar},
    )


@pytest.mark.parametrize(
    ("depth", "rbar", "n_layers"), [("unrolled", 32, 132), ("unrolled", 4, 20), ("physical", 32, 8)]
)
def test_init_std_of_every_parameter_group_follows_the_depth_formula(tp1, depth, rbar, n_layers):
    cfg = huginn_shaped(depth, rbar)
    torch.manual_seed(0)
    model = build_model(cfg)
    std = math.sqrt(2 / (5 * cfg.hidden_size))  # the base std, sqrt(2 / 5h)
    out_std = std / math.sqrt(2 * n_layers)  # 132 = 2 + 2 + 4 * 32 for huginn-0125
    expected = {
        "embedding": std,
        "adapter": std,
        "linear_qkv": std,
        "linear_fc1": std,
        "linear_proj": out_std,
        "linear_fc2": out_std,
    }
    seen = set()
    for name, p in model.named_parameters():
        kind = next((k for k in expected if k in name), None)
        if name.endswith("qk_bias"):
            assert torch.count_nonzero(p) == 0, name
            continue
        if kind is None:  # norms: ones
            assert "norm" in name or name.startswith("ln_f"), f"unclassified parameter {name}"
            assert torch.all(p == 1), name
            continue
        seen.add(kind)
        measured = float(p.detach().double().std())
        # n >= 384 * 384 samples: the std estimate is within ~0.4% (3 sigma); 3% is loose
        assert measured == pytest.approx(expected[kind], rel=0.03), (name, measured)
        assert abs(float(p.detach().double().mean())) < 0.05 * expected[kind], name
    assert seen == set(expected)


def test_train_config_carries_rbar_into_the_init():
    cfg = load_train_config(HUGINN)
    assert cfg.model.init.mean_recurrence == cfg.recurrence.mean == 32
    assert cfg.model.init_depth == 132
    cfg = load_train_config(HUGINN, ["recurrence.mean=4"])
    assert cfg.model.init_depth == 2 + 2 + 4 * 4
    pinned = load_train_config(HUGINN, ["recurrence.mean=4", "model.init.mean_recurrence=16"])
    assert pinned.model.init_depth == 2 + 2 + 4 * 16


def test_wsd_schedule_of_huginn_0125_at_chosen_steps():
    from pipeline.training.schedules import lr_at

    cfg = load_train_config(HUGINN)
    o, T = cfg.optim, cfg.train.max_steps
    assert (o.schedule, o.warmup_steps, o.cooldown_steps, o.lr, T) == (
        "wsd",
        4096,
        4096,
        4e-5,
        47684,
    )
    expected = {
        0: 4e-5 / 4096,  # warmup: (step + 1) / warmup
        2047: 4e-5 * 2048 / 4096,
        4095: 4e-5,  # warmup done
        4096: 4e-5,  # stable
        30000: 4e-5,
        T - 4096 - 1: 4e-5,  # the last stable step
        T - 4096: 4e-5,  # the cooldown starts at the peak ...
        T - 2048: 4e-5 / 2,  # ... is linear ...
        T - 1: 4e-5 / 4096,  # ... and ends one step above min_lr = 0
        T: 0.0,
    }
    for step, lr in expected.items():
        assert lr_at(step, o, T) == pytest.approx(lr, rel=1e-12, abs=1e-18), step


def dry_run(capsys, *extra):
    from pipeline.cli import main

    code = main(["train", str(HUGINN), "data.path=/nonexistent/huginn-data", *extra])
    return code, capsys.readouterr()


def test_dry_run_memory_estimate_of_huginn_0125_on_8x80gb_matches_hand_computation(capsys):
    code, out = dry_run(capsys, "--dry-run", "--nodes", "1", "--gpus-per-node", "8")
    assert code == 0, out.err
    text = out.out
    # hand computation: N = 3,564,976,800 parameters (tied), bf16 + fp32 master, ZeRO-1, dp 8;
    # gradients: bf16 (2N) and DeepSpeed's whole fp32 accumulation buffer (4N)
    N, dp = 3_564_976_800, 8
    weights, grads, optim = 2 * N + 4 * N / dp, 2 * N + 4 * N, 8 * N / dp
    h, f, V, s, k = 5280, 17920, 65536, 4096, 8
    layer = 2 * (10 * h + 3 * f)  # bytes per token of one sandwich layer (bf16)
    once = 4 * layer + 2 * 2 * h  # prelude + coda, e and s_0
    logits = V * (4 + 2)  # fp32 logits + bf16 copy
    stored = s * (once + logits + k * (4 * layer + 2 * 2 * h))
    recompute = s * (once + logits + k * 2 * h + 4 * layer + 2 * 2 * h)
    total = (weights + grads + optim + recompute) * 1.1

    def shown(label):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"#   {label}"))
        return float(line.split()[-2 if "<-" not in line else line.split().index("GB") - 1])

    assert shown("weights") == pytest.approx(weights / 1e9, abs=0.05)
    assert shown("gradients") == pytest.approx(grads / 1e9, abs=0.05)
    assert shown("optimizer state") == pytest.approx(optim / 1e9, abs=0.05)
    assert shown("activations, recompute") == pytest.approx(recompute / 1e9, abs=0.05)
    assert shown("activations, stored") == pytest.approx(stored / 1e9, abs=0.05)
    total_line = next(ln for ln in text.splitlines() if ln.startswith("#   total"))
    assert f"{total / 1e9:7.1f} GB of 80 GB" in total_line
    assert "4096 sequences = micro-batch 1 x dp 8 x accumulation 512" in text
    assert "16,777,216 tokens per step" in text


def test_dry_run_refuses_a_layout_that_cannot_fit_and_says_what_to_change(capsys):
    code, out = dry_run(
        capsys,
        "parallel.zero_stage=0",
        "parallel.activation_checkpointing=false",
        "--dry-run",
        "--nodes",
        "1",
    )
    assert code == 2
    assert "does not fit a 80 GB GPU" in out.err
    assert "parallel.activation_checkpointing=true" in out.err
    # the same layout on a 141 GB GPU fits
    code, out = dry_run(
        capsys,
        "parallel.zero_stage=0",
        "parallel.activation_checkpointing=false",
        "--dry-run",
        "--nodes",
        "1",
        "--gpu-mem",
        "141",
    )
    assert code == 0, out.err


def test_a_run_continues_with_another_rbar_without_its_init_blocking_it():
    from pipeline.training.config_change import check_continuation

    old = load_train_config(HUGINN).model_dump(mode="json")
    new = load_train_config(HUGINN, ["recurrence.mean=16", "telemetry.interval=8"])
    problems = check_continuation(old, new.model_dump(mode="json"))
    # r-bar also moved model.init.mean_recurrence: only the recurrence change needs consent
    assert len(problems) == 1 and problems[0].startswith("recurrence.mean: 32.0 -> 16.0")
    older = {k: v for k, v in old.items() if k != "telemetry"}  # a run from before telemetry
    older["model"] = {k: v for k, v in old["model"].items() if k != "init"}
    assert check_continuation(older, load_train_config(HUGINN).model_dump(mode="json")) == []
