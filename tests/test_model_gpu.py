"""GPU checks of the model (skipped without CUDA): bf16 backends agree, the flash backend
when flash_attn is importable, and the benchmark's GPU path on a small shape (its FLOPs and
MFU against a count by hand)."""

from __future__ import annotations

import pytest
import torch
from test_model import batch, small_cfg
from test_model_reference import tp1  # noqa: F401

pytestmark = pytest.mark.gpu


def build_on_cuda(cfg, dtype):
    from pipeline.model import build_model

    torch.manual_seed(0)
    with torch.device("cuda"):
        return build_model(cfg, params_dtype=dtype)


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_gpu_backends_match_math_in_bf16(tp1, backend):
    from pipeline.model.attention import _flash_attn_func

    if backend == "flash" and _flash_attn_func is None:
        pytest.skip("flash_attn is not installed")
    ids, labels = (t.cuda() for t in batch(small_cfg(), S=128))
    losses = {}
    for name in ("math", backend):
        model = build_on_cuda(small_cfg(attention_backend=name), torch.bfloat16)
        out = model(ids, labels, r=4, backprop_depth=2, state_init="zero")
        out.loss_BS.mean().backward()
        losses[name] = out.loss_BS.float()
    torch.testing.assert_close(losses[backend], losses["math"], atol=3e-2, rtol=3e-2)


def test_gpu_fp32_sdpa_matches_cpu_math(tp1):
    cfg = small_cfg()
    ids, labels = batch(cfg)
    from pipeline.model import build_model

    torch.manual_seed(0)
    cpu_model = build_model(cfg)
    gpu_model = build_on_cuda(cfg.model_copy(update={"attention_backend": "sdpa"}), torch.float32)
    gpu_model.load_state_dict(cpu_model.state_dict())
    with torch.no_grad():
        a = cpu_model(ids, r=3, state_init="zero").logits_BSV
        b = gpu_model(ids.cuda(), r=3, state_init="zero").logits_BSV.cpu()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_gpu_bench_reports_hand_counted_flops_for_eager_and_compiled(tp1, tmp_path):
    import json
    from pathlib import Path

    from flops_by_hand import hand_flops_from_model_yaml
    from test_model_bench import load_bench

    bench = load_bench()
    tiny = Path(__file__).resolve().parents[1] / "configs/model/tiny.yaml"
    rc = bench.main(
        [
            "--config",
            str(tiny),
            "--seq-len",
            "256",
            "--r",
            "4",
            "--k",
            "2",
            "--backends",
            "sdpa",
            "--compile",
            "both",
            "--warmup",
            "1",
            "--iters",
            "2",
            "--peak-tflops",
            "989",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    (result,) = tmp_path.glob("model-*.json")
    record = json.loads(result.read_text())
    rows = record["results"]
    assert sorted(row["compile"] for row in rows) == [False, True]
    hand = hand_flops_from_model_yaml(tiny, seq=256, r=4, k=2) * 2 * 256  # micro-batch 2
    for row in rows:
        assert "error" not in row, row
        assert row["backend"] == "sdpa"
        assert row["model_flops"] == hand
        assert row["tflops"] * 1e12 * row["step_s"] == pytest.approx(hand, rel=1e-9)
        assert row["mfu"] == pytest.approx(hand / row["step_s"] / 989e12, rel=1e-9)
        assert row["recompiles_after_warmup"] == 0
    compiled = next(row for row in rows if row["compile"])
    assert compiled["compiled_graphs"] >= 3  # prelude, core iteration, coda
