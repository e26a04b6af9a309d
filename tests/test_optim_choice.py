"""Which optimizer implementation a run gets (optim.impl), on this machine and on a described
one: a CUDA machine without a prebuilt fused Adam (no nvcc needed) gets torch's fused AdamW
handed to DeepSpeed and no config-declared optimizer (which would JIT-compile at start-up)."""

from __future__ import annotations

import pytest

from distributed import run_distributed


def _cfg(*overrides):
    from pipeline.training.config import load_train_config

    return load_train_config(
        None,
        [
            "parallel.zero_stage=2",
            "train.global_batch_size=2",
            "train.micro_batch_size=2",
            "optim.lr=0.01",
            *overrides,
        ],
    )


def _dims(cfg):
    from pipeline.training.layout import ParallelDims

    return ParallelDims.from_config(cfg, world_size=1)


def test_cuda_without_prebuilt_fused_adam_gets_torch_fused_adamw_and_no_jit_optimizer():
    import torch

    from pipeline.training.engine import deepspeed_config
    from pipeline.training.optim import build_optimizer, choose_optimizer, param_groups
    from pipeline.training.platform import Platform

    cfg = _cfg()
    gpu = Platform("cuda", fused_adam_prebuilt=False)
    ds = deepspeed_config(cfg, _dims(cfg), gpu)
    # no "optimizer" entry: DeepSpeed would build (JIT-compile) its FusedAdam from it
    assert "optimizer" not in ds
    assert ds["bf16"]["enabled"] is True  # precision auto on CUDA
    assert ds["zero_optimization"]["overlap_comm"] is True
    choice = choose_optimizer(cfg.optim, gpu)
    assert (choice.impl, choice.torch_kernel) == ("torch", "fused")
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(param_groups(model, 0.1), cfg.optim, choice)
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["fused"] is True for g in opt.param_groups)


def test_prebuilt_fused_adam_on_cuda_is_declared_in_the_deepspeed_config():
    from pipeline.training.engine import deepspeed_config
    from pipeline.training.platform import Platform

    cfg = _cfg()
    ds = deepspeed_config(cfg, _dims(cfg), Platform("cuda", fused_adam_prebuilt=True))
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["torch_adam"] is False
    assert ds["optimizer"]["params"]["weight_decay"] == cfg.optim.weight_decay


@pytest.mark.parametrize(
    "impl, device, prebuilt, expected",
    [
        ("auto", "cpu", False, ("torch", "foreach")),
        ("auto", "cpu", True, ("torch", "foreach")),  # DeepSpeed's op is a CUDA kernel
        ("auto", "cuda", True, ("deepspeed", "none")),
        ("torch", "cuda", True, ("torch", "fused")),
        ("deepspeed", "cuda", False, ("deepspeed", "none")),  # asked for: may JIT-build
        ("deepspeed", "cpu", False, ("deepspeed", "none")),
    ],
)
def test_choice_table(impl, device, prebuilt, expected):
    from pipeline.training.optim import choose_optimizer
    from pipeline.training.platform import Platform

    choice = choose_optimizer(_cfg(f"optim.impl={impl}").optim, Platform(device, prebuilt))
    assert (choice.impl, choice.torch_kernel) == expected


def test_ellis_adam_is_rdpts_own_everywhere_and_refuses_impl_deepspeed():
    from pipeline.common.errors import RdptConfigError
    from pipeline.training.optim import choose_optimizer
    from pipeline.training.platform import Platform

    cfg = _cfg("optim.name=ellis_adam")
    assert choose_optimizer(cfg.optim, Platform("cuda", True)).impl == "torch"
    with pytest.raises((RdptConfigError, ValueError), match="optim.impl=deepspeed"):
        _cfg("optim.name=ellis_adam", "optim.impl=deepspeed")


def _engine_optimizer(rank, world):
    import torch

    from pipeline.training.engine import build_engine

    cfg = _cfg()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    engine = build_engine(model, cfg, _dims(cfg))
    inner = engine.basic_optimizer
    x = torch.randn(2, 8)
    engine.backward(engine(x).pow(2).mean())
    engine.step()
    return {
        "type": type(inner).__name__,
        "foreach": [g.get("foreach") for g in inner.param_groups],
        "fused": [g.get("fused") for g in inner.param_groups],
        "declared": "optimizer" in engine.config,
    }


def test_cpu_engine_runs_torch_foreach_adamw():
    (info,) = run_distributed(_engine_optimizer, world_size=1)
    assert info["type"] == "AdamW"
    assert all(f is True for f in info["foreach"])
    assert not any(info["fused"])
    assert info["declared"] is False
