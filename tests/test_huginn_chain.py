"""Imported and exported models are usable end to end: an HF Huginn directory (the form the
published huginn-0125 comes in) is imported, evaluated, trained on for 5 steps
(model.init_from), exported again and reloaded, with consistent losses at every hop; the HF
export has the published checkpoint's keys and shapes (freqs_cis [1, T, 1, d/2, 2]) and carries
the training r-bar, which evaluation and generation use as their default r."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main

from fixtures_training import REPO, tiny_run_command, training_env


def published_keys(hf: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor the published modeling code (RavenForCausalLM) holds, with its shape, from
    its config.json: what loading an export into it requires (strictly, no key left over)."""
    h, f, heads = hf["n_embd"], hf["intermediate_size"], hf["n_heads"]
    hd, V, T = h // heads, hf["padded_vocab_size"], hf["block_size"]
    layer = {
        "norm_1.weight": (h,),
        "norm_2.weight": (h,),
        "norm_3.weight": (h,),
        "norm_4.weight": (h,),
        "attn.Wqkv.weight": (3 * h, h),
        "attn.qk_bias": (2, 1, heads, hd),
        "attn.proj.weight": (h, h),
        "mlp.fc.weight": (2 * f, h),
        "mlp.proj.weight": (h, f),
    }
    keys = {"transformer.wte.weight": (V, h), "transformer.adapter.weight": (h, 2 * h)}
    for block, n in (
        ("prelude", hf["n_layers_in_prelude"]),
        ("core_block", hf["n_layers_in_recurrent_block"]),
        ("coda", hf["n_layers_in_coda"]),
    ):
        for i in range(n):
            keys.update({f"transformer.{block}.{i}.{k}": s for k, s in layer.items()})
    keys["transformer.ln_f.weight"] = (h,)
    keys["lm_head.weight"] = (V, h)
    keys["freqs_cis"] = (1, T, 1, hd // 2, 2)
    return keys


def check_published_layout(hf_dir: Path, mean_recurrence: float) -> None:
    from safetensors import safe_open

    hf = json.loads((hf_dir / "config.json").read_text())
    assert hf["mean_recurrence"] == mean_recurrence and hf["model_type"] == "huginn_raven"
    # the published config class passes tie_word_embeddings itself: a second one is an error
    assert "tie_word_embeddings" not in hf and hf["tie_embeddings"] is True
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert have == published_keys(hf)
    assert (hf_dir / "tokenizer.json").is_file()


def eval_loss(target: Path, tokens: Path, out: Path, r: int = 4) -> float:
    args = ["eval", str(target), "--tokens", str(tokens), "--recurrences", str(r)]
    assert main([*args, "--state-init", "zero", "--no-mlflow", "--json", str(out)]) == 0
    return json.loads(out.read_text())["depth"][str(r)]["loss"]


@pytest.mark.slow
def test_import_eval_continue_export_reload(tiny_trained_run, tiny_dataset, tmp_path, capsys):
    from pipeline.data.loader import iterate_sequences
    from pipeline.eval.loading import default_r, load_model_and_tokenizer

    inputs, targets, _ = next(iterate_sequences(tiny_dataset, "val", batch_size=8))
    tokens = tmp_path / "val8.npy"
    arr = np.concatenate([inputs.numpy(), targets.numpy()[:, -1:]], axis=1)
    np.save(tokens, arr.astype(np.uint16))

    # the "published" checkpoint: an HF Huginn directory (here written by rdpt export)
    hf = tmp_path / "huginn-hf"
    assert main(["export", str(tiny_trained_run), str(hf), "--format", "hf"]) == 0
    check_published_layout(hf, mean_recurrence=4)
    ref = eval_loss(tiny_trained_run, tokens, tmp_path / "run.json")
    assert eval_loss(hf, tokens, tmp_path / "hf.json") == pytest.approx(ref, abs=1e-5)

    # import, then evaluate the import: a new user's first two commands
    ck = tmp_path / "ck"
    assert main(["convert", "--from-hf", str(hf), str(ck)]) == 0
    assert eval_loss(ck, tokens, tmp_path / "ck.json") == pytest.approx(ref, abs=1e-5)
    loaded = load_model_and_tokenizer(str(ck))
    assert default_r(loaded) == 4 and loaded.tokenizer is not None  # trained r-bar, tokenizer
    gen = tmp_path / "gen.json"
    args = ["generate", str(ck), "--prompt", "def ", "--max-new-tokens", "4", "--json", str(gen)]
    assert main(args) == 0
    assert json.loads(gen.read_text())["config"]["r"] == 4  # no r given: the training r-bar

    # continue pretraining from the import for 5 steps at a tiny learning rate
    run_dir = tmp_path / "continued"
    cmd = tiny_run_command(
        tiny_dataset,
        run_dir,
        None,
        f"model.init_from={ck}",
        "train.max_steps=5",
        "optim.lr=1e-7",
        "optim.min_lr=0",
        "optim.warmup_steps=0",
        "eval.interval=0",
        "checkpoint.interval=5",
        "telemetry.interval=0",
        "debug.record_sample_ids=false",
    )
    proc = subprocess.run(
        cmd, cwd=REPO, env=training_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train/loss"] < ref + 0.5  # started from the imported weights, not from scratch
    cont = eval_loss(run_dir, tokens, tmp_path / "cont.json")
    assert cont == pytest.approx(ref, abs=1e-3) and cont != ref  # trained, barely

    # export the continued model to the HF layout and reload it
    hf2 = tmp_path / "continued-hf"
    assert main(["export", str(run_dir), str(hf2), "--format", "hf"]) == 0
    check_published_layout(hf2, mean_recurrence=4)
    assert eval_loss(hf2, tokens, tmp_path / "hf2.json") == pytest.approx(cont, abs=1e-5)
