"""Shared pytest set-up. GPU tests are marked `gpu` and skip without CUDA; everything else
runs by default on the CPU-only CI machine."""

from __future__ import annotations

import os

import pytest

# Fixture modules shared across test files (each owned by one area of the code).
pytest_plugins = [
    "fixtures_data",  # tiny prepared datasets (rdpt prep on real text)
    "fixtures_mlflow",  # a real MLflow tracking server on 127.0.0.1 (sqlite)
    "fixtures_model",  # a small random model for decode/evaluation tests
    "fixtures_slurm",  # a real Slurm cluster (munged, slurmctld, slurmd) in a temp dir
    "fixtures_training",  # tiny trained runs/checkpoints (real DeepSpeed)
]

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DS_BUILD_OPS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _restore_environment():
    """Tests that call rdpt in-process (a one-rank training run exports RANK/WORLD_SIZE/MASTER_*
    for DeepSpeed) must not hand those variables to later tests' launches."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU (torch.cuda.is_available() is False)",
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
