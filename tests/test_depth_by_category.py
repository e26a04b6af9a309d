"""Exit depths per input category (pipeline/eval/depth_by_category.py): every token's depth is
the one the general decode path (rdpt's decode before the lean loop) gives the same token
read in the same way, the histograms count exactly those depths, and the plot draws them."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from fixtures_model import SMALL_VOCAB

from pipeline.common.errors import RdptDataError
from pipeline.eval.adaptive import ExitRule
from pipeline.eval.depth_by_category import depths_by_category, read_category_jsonl
from pipeline.eval.generate import GenerationConfig

VOCAB = SMALL_VOCAB  # the vocabulary of small_eval_model


def _baselines():
    path = Path(__file__).resolve().parents[1] / "bench" / "decode_baselines.py"
    spec = importlib.util.spec_from_file_location("decode_baselines", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def model(small_eval_model):  # tests/fixtures_model.py
    return small_eval_model


def encode(text: str) -> list[int]:
    return [ord(c) % VOCAB for c in text]


def _depths_before(model, ids, rule, max_r, cot):
    """Token by token through the general path (model.prelude / core_step / coda, KVCache)."""
    base = _baselines()
    cfg = GenerationConfig(r=max_r, exit_rule=rule, continuous_cot=cot)
    cache, warm, depths = base.new_kv_cache(), None, []
    with torch.no_grad():
        for offset, tok in enumerate(ids):
            ids_BS = torch.tensor([[tok]])
            _, last, depth = base._run_chunk(model, ids_BS, cache, offset, cfg, warm, True)
            depths.append(depth)
            warm = last if cot else None
    return depths


def test_category_depths_are_the_per_token_exit_depths(model, tmp_path):
    from pipeline.tracking.plots import drawn, plot_exit_histograms

    f = tmp_path / "texts.jsonl"
    rows = [
        {"text": "alpha beta gamma", "category": "greek"},
        {"text": "x = y + 1", "category": "math", "extra": 1},
        {"text": "delta", "category": "greek"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    texts = read_category_jsonl(f)
    assert texts == {"greek": ["alpha beta gamma", "delta"], "math": ["x = y + 1"]}
    rule = ExitRule("kl", 0.03)
    out = depths_by_category(model, encode, texts, rule, 8)
    for category, items in texts.items():
        for cond, cot in (("plain", False), ("cot", True)):
            want = [d for t in items for d in _depths_before(model, encode(t), rule, 8, cot)]
            got = out[category][cond]
            assert got["depths"] == want
            assert got["tokens"] == sum(len(encode(t)) for t in items)
            assert got["histogram"] == {str(d): c for d, c in sorted(Counter(want).items())}
            assert got["mean_depth"] == pytest.approx(sum(want) / len(want))
    all_depths = out["greek"]["plain"]["depths"] + out["greek"]["cot"]["depths"]
    assert len(set(all_depths)) > 1  # the threshold makes tokens exit at different depths
    hists = {
        c: {int(d): n for d, n in out["greek"][c]["histogram"].items()} for c in ("plain", "cot")
    }
    (panel,) = drawn(plot_exit_histograms(hists, 8, tmp_path / "greek.png", "greek"))
    for k, cond in enumerate(("plain", "cot")):
        depths = out["greek"][cond]["depths"]
        assert panel["bars"][8 * k : 8 * k + 8] == [depths.count(d) for d in range(1, 9)]
        assert f"mean depth {sum(depths) / len(depths):.2f}" in panel["legend"][k]


def test_bad_category_files_are_clear_errors(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a", "category": "x"}\n{"text": "b"}\n')
    with pytest.raises(RdptDataError, match="bad.jsonl:2: needs the fields 'text' and 'category'"):
        read_category_jsonl(f)
    f.write_text("not json\n")
    with pytest.raises(RdptDataError, match="bad.jsonl:1: not JSON"):
        read_category_jsonl(f)
    with pytest.raises(RdptDataError, match="no such file"):
        read_category_jsonl(tmp_path / "missing.jsonl")
