"""The tiny model's first 30 training steps (fp32, CPU, one process) against a stored curve: a
silent numerical change (init, norms, RoPE, the loss, the optimizer, the data order) fails CI.

The dataset is a synthetic corpus generated here from a fixed linear congruential generator
(no file of the machine, no numpy stream), prepared with the real `rdpt prep`; training is the
real `pipeline.train.main` with the tiny model. The stored curve and its tolerance live in
tests/assets/losses/tiny-fp32-cpu.json.

Tolerance. Kernels for the same op sum in different orders on different CPUs, so the curve is
not bitwise portable. It was measured by training the same 30 steps under the code paths a
different CPU would take: ATen's AVX512, AVX2 and scalar kernels (ATEN_CPU_CAPABILITY), MKL
restricted to AVX2 (MKL_ENABLE_INSTRUCTIONS, what MKL does on AMD EPYC), and 1 or 2 OpenMP
threads, and by making two real changes (a 1% change of the learning rate, of the init std).
The stored tolerance is the geometric mean of the largest deviation between kernel variants and
the smallest real change: on the machine it was measured on (the asset's `measured`), 4.8e-7
and 1.1e-2 give 7.2e-5, two orders of magnitude from each side, which leaves room for CPUs
(AMD EPYC) that sum in still other orders while any real change still fails.

    python tests/test_loss_curve.py --measure   # re-measure the variants, rewrite the asset
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.common.distributed import free_port
from pipeline.common.machine import cpu_model

REPO = Path(__file__).resolve().parent.parent
ASSET = REPO / "tests" / "assets" / "losses" / "tiny-fp32-cpu.json"
STEPS = 30
VARIANTS = {  # environment of each measured code path
    "default": {},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten-scalar": {"ATEN_CPU_CAPABILITY": "default"},
    "mkl-avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "2-threads": {"OMP_NUM_THREADS": "2"},
}
CHANGES = {  # real changes the curve must notice
    "lr+1%": ["optim.lr=3.03e-3"],
    "init_std+1%": ["model.init_std=0.056462"],  # 1.01 x sqrt(2 / (5 * 128))
}

SYLLABLES = ["ka", "lo", "mi", "nu", "re", "sa", "ti", "vo", "ze", "pu", "da", "fe"]


def synthetic_corpus(n_docs: int = 240, seed: int = 12345) -> list[str]:
    """Documents of sentences over a small invented vocabulary, with learnable structure
    (subject-verb-object patterns, repeated phrases). Pure integer arithmetic: identical on
    every machine."""
    x = seed

    def rand(n: int) -> int:
        nonlocal x
        x = (6364136223846793005 * x + 1442695040888963407) % 2**64
        return (x >> 33) % n

    words = [
        SYLLABLES[i % 12] + SYLLABLES[(i * 7 + 3) % 12] + ("n" if i % 3 == 0 else "")
        for i in range(60)
    ]
    nouns, verbs, adjs = words[:30], words[30:45], words[45:]
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(8 + rand(8)):
            s = f"the {adjs[rand(15)]} {nouns[rand(30)]} {verbs[rand(15)]} a {nouns[rand(30)]}"
            if rand(3) == 0:
                s += f" with the {nouns[rand(30)]}"
            sentences.append(s.capitalize() + ".")
        docs.append(" ".join(sentences) + "\n")
    return docs


def build_dataset(root: Path) -> Path:
    from data_prep.config import PrepConfig
    from data_prep.prep import prepare

    text = root / "text"
    text.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(synthetic_corpus()):
        (text / f"doc{i:04d}.txt").write_text(doc)
    out = root / "data"
    prepare(
        PrepConfig(
            inputs=[str(text)],
            output=str(out),
            tokenizer={"vocab_size": 384},
            seq_len=64,
            val_fraction=0.05,
            seqs_per_member=16,
            workers=1,
        )
    )
    return out


def train_curve(root: Path, overrides: list[str] = ()) -> list[float]:
    """train/loss of steps 1..STEPS of the tiny model on the synthetic dataset (this process)."""
    from pipeline.train import main
    from pipeline.training.config import load_train_config
    from pipeline.training.resolve import resolve

    data = root / "data" if (root / "data" / "manifest.json").is_file() else build_dataset(root)
    run = root / f"run-{len(list(root.glob('run-*')))}"
    cfg = load_train_config(
        REPO / "configs/train/tiny.yaml",
        [
            f"data.path={data}",
            f"run.dir={run}",
            f"train.max_steps={STEPS}",
            "train.global_batch_size=8",
            "train.micro_batch_size=4",
            "train.precision=fp32",
            "train.compile=false",
            "train.log_interval=1",
            "optim.warmup_steps=5",
            "parallel.zero_stage=0",
            "eval.interval=0",
            "checkpoint.interval=1000",
            "tracking.enabled=false",
            *overrides,
        ],
    )
    cfg, _ = resolve(cfg, world_size=1)
    assert main(cfg, resume="none") == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        rec["train/loss"] for rec in sorted(lines, key=lambda r: r["step"]) if "train/loss" in rec
    ]


def max_deviation(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_tiny_model_loss_curve_matches_the_stored_one(tmp_path, monkeypatch):
    # training in this process exports the rank variables DeepSpeed reads; undone afterwards
    for var, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    stored = json.loads(ASSET.read_text())
    curve = train_curve(tmp_path)
    assert len(curve) == STEPS
    deviation = max_deviation(curve, stored["losses"])
    assert deviation <= stored["tolerance"], (
        f"the loss curve moved by {deviation:.3g} (> tolerance {stored['tolerance']:.3g}); if "
        f"the change is intended, re-measure with `python tests/test_loss_curve.py --measure`"
        f"\nnow:    {[round(x, 6) for x in curve]}\nstored: {stored['losses']}"
    )
    assert curve[-1] < curve[0] - 0.5  # and it trains


def _curve_in_subprocess(env_extra: dict, overrides: list[str]) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    code = (
        "import json, sys, tempfile, pathlib; sys.path.insert(0, 'tests');"
        "import test_loss_curve as t;"
        f"print(json.dumps(t.train_curve(pathlib.Path(tempfile.mkdtemp()), {overrides!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure() -> dict:
    """Train under every variant and every change; write and return the asset."""
    import torch

    curves = {name: _curve_in_subprocess(env, []) for name, env in VARIANTS.items()}
    ref = curves["default"]
    deviations = {n: max_deviation(c, ref) for n, c in curves.items() if n != "default"}
    changes = {n: max_deviation(_curve_in_subprocess({}, o), ref) for n, o in CHANGES.items()}
    noise, signal = max(max(deviations.values()), 1e-9), min(changes.values())
    assert signal > 100 * noise, (
        f"real changes ({signal:.3g}) barely exceed the noise ({noise:.3g})"
    )
    tolerance = math.sqrt(noise * signal)
    asset = {
        "what": "train/loss of steps 1..30, tiny model, synthetic corpus, fp32, CPU, 1 process",
        "losses": ref,
        "tolerance": tolerance,
        "measured": {
            "machine": f"{cpu_model()}, torch {torch.__version__}",
            "max_deviation_per_variant": deviations,
            "max_deviation_per_real_change": changes,
        },
    }
    ASSET.parent.mkdir(parents=True, exist_ok=True)
    ASSET.write_text(json.dumps(asset, indent=2) + "\n")
    return asset

    return "unknown CPU"


if __name__ == "__main__":
    if "--measure" in sys.argv:
        print(json.dumps(measure()["measured"], indent=2))
    else:
        print(train_curve(Path(tempfile.mkdtemp())))
