"""HF Huginn layout <-> rdpt consolidated checkpoint: bitwise round trip through the CLI and
logits of the converted model against the independent reference."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model_reference import (  # noqa: F401  (tp1 is a fixture)
    huginn_forward,
    random_hf_state_dict,
    small_hf_config,
    tp1,
)

from pipeline.cli import main
from pipeline.common.errors import RdptCheckpointError
from pipeline.model.consolidated import build_from_consolidated, load_consolidated


def write_hf(tmp_path, hf_cfg, sd):
    d = tmp_path / "hf"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(hf_cfg))
    return d


def test_hf_round_trip_is_bitwise_and_logits_match_reference(tp1, tmp_path):
    hf_cfg = small_hf_config()
    sd = random_hf_state_dict(hf_cfg, seed=3)
    hf_dir = write_hf(tmp_path, hf_cfg, sd)
    ckpt, back = tmp_path / "rdpt", tmp_path / "hf-back"
    assert main(["convert", "--from-hf", str(hf_dir), str(ckpt)]) == 0
    assert main(["convert", "--to-hf", str(ckpt), str(back)]) == 0
    sd_back = load_file(str(back / "model.safetensors"))
    assert set(sd) <= set(sd_back) and "freqs_cis" in sd_back
    for name, t in sd.items():
        assert torch.equal(t, sd_back[name]), name
    cfg_back = json.loads((back / "config.json").read_text())
    for key in (
        "n_embd",
        "n_heads",
        "intermediate_size",
        "vocab_size",
        "n_layers_in_prelude",
        "n_layers_in_recurrent_block",
        "n_layers_in_coda",
        "rope_base",
        "norm_eps",
    ):
        assert cfg_back[key] == hf_cfg[key], key
    # QKV really is re-laid out (megatron head-major) inside the rdpt checkpoint.
    cfg, rd = load_consolidated(ckpt)
    w_hf = sd["transformer.core_block.0.attn.Wqkv.weight"]
    w_rd = rd["core_block.0.self_attention.linear_qkv.weight"]
    hd = cfg.head_dim
    assert torch.equal(
        w_rd[hd : 2 * hd], w_hf[cfg.hidden_size : cfg.hidden_size + hd]
    )  # k of head 0

    model, cfg = build_from_consolidated(ckpt)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf_cfg["vocab_size"], (2, 16), generator=g)
    for r in (1, 4, 7):
        with torch.no_grad():
            out = model(ids, r=r, state_init="zero").logits_BSV
            s0 = torch.zeros(2, 16, hf_cfg["n_embd"])
            ref = huginn_forward(sd, hf_cfg, ids, r, s0)
        torch.testing.assert_close(out, ref, atol=3e-5, rtol=1e-5)


def test_convert_refuses_bad_inputs(tmp_path):
    hf_cfg = small_hf_config()
    sd = random_hf_state_dict(hf_cfg, seed=1)
    del sd["transformer.core_block.1.mlp.fc.weight"]
    hf_dir = write_hf(tmp_path, hf_cfg, sd)
    with pytest.raises(RdptCheckpointError, match="core_block.1.mlp.fc.weight"):
        from pipeline.model.hf_convert import convert_from_hf

        convert_from_hf(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["convert", "--to-hf", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
