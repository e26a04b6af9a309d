"""TrainConfig validation, LR schedules and `rdpt train` refusing bad configs before any
process starts (no torch.distributed, no run directory)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipeline.cli import main as rdpt
from pipeline.common.errors import RdptConfigError
from pipeline.training.config import TrainConfig, load_train_config
from pipeline.training.layout import ParallelDims
from pipeline.training.resolve import resolve
from pipeline.training.schedules import cosine_lr, lr_at, wsd_lr

REPO = Path(__file__).resolve().parent.parent


def test_shipped_configs_load_and_carry_the_paper_recipe():
    tiny = load_train_config(REPO / "configs/train/tiny.yaml")
    assert tiny.parallel.zero_stage == 2 and tiny.parallel.nproc == 2
    assert tiny.model.hidden_size < 512
    huginn = load_train_config(REPO / "configs/train/huginn.yaml")
    assert huginn.optim.lr == 4e-5 and huginn.optim.warmup_steps == 4096
    assert tuple(huginn.optim.betas) == (0.9, 0.95) and huginn.optim.grad_clip == 1.0
    assert huginn.optim.weight_decay > 0
    assert huginn.recurrence.mean == 32 and huginn.recurrence.backprop_depth == 8
    big = load_train_config(
        REPO / "configs/train/huginn.yaml", [f"model={REPO / 'configs/model/huginn-3.5b.yaml'}"]
    )
    assert big.model.hidden_size == 5280


def test_dotted_overrides_users_reach_for_first():
    cfg = load_train_config(
        REPO / "configs/train/tiny.yaml",
        [
            "data.path=/x",
            "train.max_steps=7",
            "train.global_batch_size=32",
            "train.micro_batch_size=2",
            "optim.lr=1e-3",
            "recurrence.mean=8",
            "recurrence.backprop_depth=4",
            "parallel.tp=2",
            "parallel.zero_stage=3",
            "checkpoint.interval=5",
            "run.name=abc",
            "run.dir=/tmp/r",
        ],
    )
    assert (cfg.data.path, cfg.train.max_steps, cfg.optim.lr) == ("/x", 7, 1e-3)
    assert cfg.recurrence.mean == 8 and cfg.recurrence.backprop_depth == 4
    assert cfg.parallel.tp == 2 and cfg.parallel.zero_stage == 3
    assert cfg.run_dir() == Path("/tmp/r")
    assert TrainConfig(run={"name": "n"}).run_dir() == Path("runs/n")


def test_cross_field_rules_name_every_degree():
    with pytest.raises(RdptConfigError, match="parallel.zero_stage"):
        load_train_config(None, ["parallel.zero_stage=4"])
    with pytest.raises(
        RdptConfigError, match="global_batch_size=10 is not divisible by train.micro_batch_size=4"
    ):
        load_train_config(None, ["train.global_batch_size=10", "train.micro_batch_size=4"])
    cfg = load_train_config(
        None,
        [
            "train.global_batch_size=12",
            "train.micro_batch_size=2",
            "model.num_heads=4",
            "model.hidden_size=64",
        ],
    )
    dims = ParallelDims.from_config(cfg, 3)
    assert (dims.tp, dims.dp, dims.grad_accum) == (1, 3, 2)
    with pytest.raises(RdptConfigError, match=r"2 x 4 = 8 \(world 4 = tp 1 x dp 4\)"):
        ParallelDims.from_config(cfg, 4)
    cfg.parallel.tp = 2
    with pytest.raises(RdptConfigError, match="parallel.tp=2 does not divide the world size 3"):
        ParallelDims.from_config(cfg, 3)
    cfg.parallel.tp = 8
    with pytest.raises(RdptConfigError, match="model.num_heads"):
        ParallelDims.from_config(cfg, 8)


def test_resolve_wants_a_prepared_dataset_and_fills_what_it_decides(tmp_path, tiny_dataset):
    cfg = load_train_config(REPO / "configs/train/tiny.yaml", [f"data.path={tmp_path / 'nope'}"])
    with pytest.raises(RdptConfigError, match="does not exist"):
        resolve(cfg, 2)
    (tmp_path / "empty").mkdir()
    cfg.data.path = str(tmp_path / "empty")
    with pytest.raises(RdptConfigError, match="no manifest.json"):
        resolve(cfg, 2)
    cfg.data.path = str(tiny_dataset)
    cfg.run.dir = "relative/run"
    resolved, dims = resolve(cfg, 2)
    manifest = __import__("json").loads((tiny_dataset / "manifest.json").read_text())
    assert resolved.model.vocab_size == manifest["vocab_size"]
    assert (resolved.parallel.nproc, dims.dp) == (2, 2)
    assert resolved.run.dir == str(Path("relative/run").resolve())
    assert cfg.run.dir == "relative/run"  # the input config is left as it was


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.global_batch_size=15", "global_batch_size=15 is not divisible"),
        (
            "train.global_batch_size=4",
            "global_batch_size=4 is not divisible by train.micro_batch_size"
            " x data-parallel size = 4 x 2",
        ),
        ("parallel.zero_stage=4", "parallel.zero_stage"),
        (
            "data.path=/nonexistent/dataset",
            "data.path: dataset directory '/nonexistent/dataset' does not exist",
        ),
    ],
)
def test_rdpt_train_refuses_bad_config_before_any_process(
    override, message, tmp_path, tiny_dataset, capsys
):
    run_dir = tmp_path / "run"
    code = rdpt(
        [
            "train",
            str(REPO / "configs/train/tiny.yaml"),
            f"data.path={tiny_dataset}",
            f"run.dir={run_dir}",
            override,
            "--nproc",
            "2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert "Traceback" not in err
    assert not run_dir.exists()  # nothing started, nothing written


def test_dry_run_prints_generated_deepspeed_config(tiny_dataset, capsys):
    code = rdpt(
        [
            "train",
            str(REPO / "configs/train/tiny.yaml"),
            f"data.path={tiny_dataset}",
            "parallel.zero_stage=3",
            "train.global_batch_size=32",
            "--nproc",
            "2",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert '"stage": 3' in out and '"gradient_accumulation_steps": 4' in out
    assert '"train_batch_size": 32' in out
    assert "vocab_size: 512" in out  # taken from the dataset manifest


def test_cosine_schedule_shape():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert cosine_lr(0, **kw) == pytest.approx(0.1)
    assert cosine_lr(9, **kw) == pytest.approx(1.0)
    assert cosine_lr(60, **kw) == pytest.approx(0.55)
    assert cosine_lr(110, **kw) == pytest.approx(0.1)
    values = [cosine_lr(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_schedule_shape_and_dispatch():
    kw = dict(lr=1.0, min_lr=0.0, warmup_steps=10, max_steps=100, decay_fraction=0.2)
    assert wsd_lr(5, **kw) == pytest.approx(0.6)
    assert wsd_lr(10, **kw) == wsd_lr(79, **kw) == 1.0
    assert wsd_lr(90, **kw) == pytest.approx(0.5)
    assert wsd_lr(100, **kw) == pytest.approx(0.0)
    cfg = load_train_config(
        None,
        [
            "optim.schedule=wsd",
            "optim.lr=1.0",
            "optim.min_lr=0",
            "optim.warmup_steps=10",
            "optim.decay_fraction=0.2",
        ],
    )
    assert lr_at(90, cfg.optim, 100) == pytest.approx(0.5)
    cfg.optim.schedule = "cosine"
    assert lr_at(55, cfg.optim, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
