"""CheckpointManager with a real DeepSpeed engine (ZeRO-2, gloo, one process): atomic
directories, `latest` pointer, keep-last-K, sha256 verification naming the corrupted file,
auto-resume falling back past it, a crash while saving leaving the previous checkpoint
loadable, and refusal of a different dataset or model config."""

from __future__ import annotations

from pathlib import Path

import pytest

from distributed import run_distributed


def _engine(seed: int):
    import torch

    from pipeline.training.config import load_train_config
    from pipeline.training.engine import build_engine
    from pipeline.training.layout import ParallelDims

    cfg = load_train_config(
        None,
        [
            "parallel.zero_stage=2",
            "train.global_batch_size=2",
            "train.micro_batch_size=2",
            "optim.lr=0.01",
        ],
    )
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return build_engine(model, cfg, ParallelDims.from_config(cfg, world_size=1))


def _identity(manifest: str, hidden: int, dp: int) -> dict:
    return {
        "manifest_sha256": manifest,
        "model_config": {"hidden_size": hidden},
        "parallel": {"tp": 1, "dp": dp, "zero_stage": 2},
    }


def _train(engine, steps: int) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(2, 8, generator=g)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()


def _params(engine):
    return [p.detach().clone() for p in engine.module.parameters()]


def checkpoint_checks(rank, world, tmp: str):
    import torch

    from pipeline.common.errors import RdptCheckpointError
    from pipeline.training.checkpoint import (
        CheckpointManager,
        check_compatible,
        read_trainer_state,
        verify_checkpoint,
    )

    run_dir = Path(tmp) / "run"
    mgr = CheckpointManager(run_dir, keep_last=2)
    engine = _engine(0)
    saved = {}
    for step in (1, 2, 3):
        _train(engine, 1)
        state = {
            "loader": {"position": step},
            "manifest_sha256": "abc",
            "model_config": {"hidden_size": 8},
            "parallel": {"tp": 1, "dp": 1, "zero_stage": 2},
        }
        mgr.save(engine, step, state, config_yaml="a: 1\n")
        saved[step] = _params(engine)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["latest", "step-00000002", "step-00000003"], names  # kept the last 2
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step-00000003"
    verify_checkpoint(run_dir / "checkpoints/step-00000003")

    # a crash half-way through saving step 4: no step-4 dir, `latest` unchanged, step 3 loads
    class Crash(Exception):
        pass

    def crash(phase, engine):
        if phase == "files":  # everything written, nothing hashed or renamed
            raise Crash()

    _train(engine, 1)
    with pytest.raises(Crash):
        mgr.save(engine, 4, {"loader": {}}, config_yaml="a: 1\n", phase_hook=crash)
    assert not (run_dir / "checkpoints/step-00000004").exists()
    assert (run_dir / "checkpoints/.tmp-step-00000004").is_dir()
    assert mgr.find_resume("auto").name == "step-00000003"
    fresh = _engine(1)
    state = mgr.load(fresh, mgr.find_resume("auto"))
    assert state["step"] == 3 and state["loader"] == {"position": 3}
    for a, b in zip(_params(fresh), saved[3]):
        assert torch.equal(a, b)
    # the restored optimizer continues exactly like the original would have
    reference = _engine(2)
    mgr.load(reference, run_dir / "checkpoints/step-00000003")
    _train(fresh, 2)
    _train(reference, 2)
    for a, b in zip(_params(fresh), _params(reference)):
        assert torch.equal(a, b)

    # corruption: refused by name; auto-resume falls back to the previous good checkpoint
    victim = sorted((run_dir / "checkpoints/step-00000003/ds").iterdir())[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(RdptCheckpointError, match=f"{victim.name} is corrupted"):
        verify_checkpoint(run_dir / "checkpoints/step-00000003")
    with pytest.raises(RdptCheckpointError, match="corrupted"):
        mgr.find_resume(str(run_dir / "checkpoints/step-00000003"))
    assert mgr.find_resume("auto").name == "step-00000002"
    assert mgr.find_resume("none") is None
    # compatibility: a different dataset or model is refused, saying what differs
    ckpt = run_dir / "checkpoints/step-00000002"
    st = read_trainer_state(ckpt)
    with pytest.raises(RdptCheckpointError, match="different dataset: manifest sha256 abc"):
        check_compatible(st, ckpt, _identity("xyz", 8, dp=1))
    with pytest.raises(RdptCheckpointError, match="model.hidden_size: 8 in checkpoint, 16 now"):
        check_compatible(st, ckpt, _identity("abc", 16, dp=1))
    with pytest.raises(RdptCheckpointError, match="ZeRO stage 2 x dp 1; now stage 2 x dp 2"):
        check_compatible(st, ckpt, _identity("abc", 8, dp=2))
    check_compatible(st, ckpt, _identity("abc", 8, dp=1))

    # a later save cleans the stale temp dir and still keeps 2
    mgr.save(fresh, 5, {"loader": {}}, config_yaml="a: 1\n")
    assert not (run_dir / "checkpoints/.tmp-step-00000004").exists()
    assert [c.name for c in mgr.complete_checkpoints()] == ["step-00000003", "step-00000005"]
    return True


def test_checkpoint_manager_with_a_real_deepspeed_engine(tmp_path):
    assert run_distributed(
        checkpoint_checks, world_size=1, args=(str(tmp_path),), env={"OMP_NUM_THREADS": "1"}
    ) == [True]


class _Payload:
    """Unpickling this runs code (creates a file): what a tampered checkpoint would carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_loads_never_unpickle_arbitrary_objects(tmp_path, tiny_trained_run):
    import torch

    from pipeline.common.errors import RdptCheckpointError
    from pipeline.training.checkpoint import (
        consolidated_state_dict,
        resolve_checkpoint,
        weights_only_loads,
    )

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"module": {"w": torch.ones(2)}, "x": _Payload(str(marker))}, evil)
    # DeepSpeed passes weights_only=False itself: the guard forces the safe unpickler
    with pytest.raises(RdptCheckpointError, match="refusing to load"), weights_only_loads():
        torch.load(evil, weights_only=False)
    assert not marker.exists()
    # a real DeepSpeed checkpoint loads under the guard to exactly what DeepSpeed's own
    # (unguarded) consolidation gives for this trusted fixture
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.model.consolidated import consolidated_name

    ckpt = resolve_checkpoint(tiny_trained_run)
    guarded = consolidated_state_dict(ckpt)
    plain = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds")
    assert len(guarded) == len(plain) > 10
    for name, t in plain.items():
        assert torch.equal(guarded[consolidated_name(name)], t.float()), name
