"""`model.init_from`: a training run starts from weights made elsewhere (a run, a consolidated
export, a Hugging Face Huginn directory) at any TP size and ZeRO stage; the engine built by
`parallelize` then holds exactly those weights. Exports carry the training recurrence."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.common.errors import RdptConfigError

from distributed import run_distributed

REPO = Path(__file__).resolve().parent.parent


def _engine_weights(rank, world, run_dir: str, source: str, overrides: list[str]):
    """Build the engine as training does, with init_from=source; its full weights on rank 0."""
    import deepspeed
    import torch

    from pipeline.model import build_model
    from pipeline.model.consolidated import consolidated_name, full_state_dict
    from pipeline.model.runtime import destroy_model_parallel
    from pipeline.training.checkpoint import checkpoint_config, resolve_checkpoint
    from pipeline.training.layout import ParallelDims
    from pipeline.training.parallel import parallelize

    cfg = checkpoint_config(resolve_checkpoint(run_dir))
    cfg.model.init_from = source
    for o in overrides:
        key, value = o.split("=")
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, yaml.safe_load(value))
    cfg.run.dir = str(Path(run_dir).parent / f"unused-{rank}")
    dims = ParallelDims.from_config(cfg, world)
    engine = parallelize(lambda dt: build_model(cfg.model, params_dtype=dt), dims, cfg)
    try:
        if cfg.parallel.zero_stage == 3:
            out = {}
            for name, p in engine.module.named_parameters():
                with deepspeed.zero.GatheredParameters([p]):
                    out[consolidated_name(name)] = p.detach().clone()
        else:
            out = full_state_dict(engine.module)  # gathers TP shards
        return {k: v.to(torch.float32) for k, v in out.items()} if rank == 0 else None
    finally:
        destroy_model_parallel()


@pytest.mark.slow
def test_engine_starts_from_run_consolidated_and_hf_weights(tiny_trained_run, tmp_path):
    import torch

    from pipeline.model.consolidated import read_recurrence
    from pipeline.model.hf_convert import read_hf_dir
    from pipeline.training.checkpoint import checkpoint_config, resolve_checkpoint
    from pipeline.training.export import export_checkpoint
    from pipeline.training.pretrained import read_pretrained

    trained = checkpoint_config(resolve_checkpoint(tiny_trained_run)).recurrence
    consolidated = export_checkpoint(tiny_trained_run, tmp_path / "consolidated")
    hf = export_checkpoint(tiny_trained_run, tmp_path / "hf", fmt="hf")
    # the exports carry the recurrence the model was trained with, not a default
    assert read_recurrence(consolidated) == {
        "mean_recurrence": trained.mean,
        "mean_backprop_depth": trained.backprop_depth,
    }
    hf_cfg, _ = read_hf_dir(hf)
    assert (hf_cfg["mean_recurrence"], hf_cfg["mean_backprop_depth"]) == (
        trained.mean,
        trained.backprop_depth,
    )
    expected = read_pretrained(tiny_trained_run).state_dict
    cases = {  # source, layout
        "run@zero3": (tiny_trained_run, ["parallel.zero_stage=3"]),
        "hf@zero3": (hf, ["parallel.zero_stage=3"]),
        "consolidated@tp2": (consolidated, ["parallel.zero_stage=1", "parallel.tp=2"]),
    }
    for name, (source, overrides) in cases.items():
        got = run_distributed(
            _engine_weights,
            2,
            args=(str(tiny_trained_run), str(source), overrides),
            env={"OMP_NUM_THREADS": "1"},
        )[0]
        assert sorted(got) == sorted(expected), name
        for key, want in expected.items():
            assert torch.equal(got[key], want), (name, key)


def test_init_from_that_does_not_fit_is_refused_naming_the_difference(
    tiny_trained_run, tiny_dataset
):
    from pipeline.training.config import load_train_config
    from pipeline.training.resolve import resolve

    cfg = load_train_config(
        REPO / "configs/train/tiny.yaml",
        [f"data.path={tiny_dataset}", f"model.init_from={tiny_trained_run}", "model.n_core=3"],
    )
    with pytest.raises(RdptConfigError, match=r"model.init_from: .* n_core: 2 there, 3 here"):
        resolve(cfg, 1)
    cfg.model.init_from = str(tiny_trained_run / "nope")
    with pytest.raises(RdptConfigError, match="model.init_from: .*nope does not exist"):
        resolve(cfg, 1)
