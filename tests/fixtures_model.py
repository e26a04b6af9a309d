"""Model fixtures shared by the decode and evaluation tests (registered in conftest.py).

`small_eval_model`: a small random recurrent-depth model (vocabulary `SMALL_VOCAB`, hidden 64,
prelude 1, core 2, coda 1 layers, context 64) in eval mode, seeded, TP=1; built once per test
module. Treat it as read-only. `build_small_model(**changes)` builds the same model with
config fields changed (e.g. exit_gate=True).

`c_compiler`: a C compiler for rdpt's native decode kernels (pipeline/model/native_kernels.py);
apt_packages.apt_install installs gcc when none is found (root only).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from apt_packages import apt_install

SMALL_VOCAB = 97


def build_small_model(**changes):
    """small_eval_model's model, seeded the same way, with ModelConfig fields changed."""
    from pipeline.model import ModelConfig, build_model
    from pipeline.model.runtime import init_model_parallel

    init_model_parallel(tp=1)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=SMALL_VOCAB,
        hidden_size=64,
        num_heads=4,
        ffn_hidden_size=128,
        n_prelude=1,
        n_core=2,
        n_coda=1,
        max_seq_len=64,
        **changes,
    )
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def small_eval_model():
    return build_small_model()


@pytest.fixture(scope="session")
def c_compiler() -> str:
    from pipeline.model.native_kernels import _compiler

    found = _compiler()
    if found is None:
        apt_install("gcc")
        found = shutil.which("gcc")
    return found
