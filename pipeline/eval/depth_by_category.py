"""Exit depth per input category: how many iterations adaptive exit spends on each kind of text,
with and without continuous chain of thought (the paper's figure over MMLU categories).

Input: a JSON Lines file, one text per line with a category, e.g.
`{"text": "The derivative of x^2 is", "category": "math"}` (fields configurable). Every text
is read token by token through the decode loop (decode.py) with adaptive exit, like generation
reads its own tokens: once with a fresh initial state per position and once with continuous
CoT (each position starts from the previous position's final state). Every token's exit depth
is kept; a category's histogram counts them.

    texts = read_category_jsonl("tasks/mixed.jsonl")            # {category: [text, ...]}
    out = depths_by_category(model, encode, texts, ExitRule("kl", 5e-4), max_r=32)
    out["math"]["cot"]["histogram"], out["math"]["cot"]["mean_depth"]
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from pipeline.common.errors import RdptDataError
from pipeline.eval.depth import _EvalMode, model_device

CONDITIONS = ("plain", "cot")


def read_category_jsonl(
    path: str | Path, text_field: str = "text", category_field: str = "category"
) -> dict[str, list[str]]:
    """{category: [texts]} in file order; a line without either field is an error naming it."""
    out: dict[str, list[str]] = {}
    p = Path(path)
    if not p.is_file():
        raise RdptDataError(f"--depth-categories: no such file {p}")
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RdptDataError(f"{p}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or text_field not in row or category_field not in row:
            raise RdptDataError(f"{p}:{n}: needs the fields {text_field!r} and {category_field!r}")
        out.setdefault(str(row[category_field]), []).append(str(row[text_field]))
    if not out:
        raise RdptDataError(f"{p}: no texts")
    return out


def token_exit_depths(model, ids: list[int], rule, max_r: int, cfg_kw: dict) -> list[int]:
    """Exit depth of every token of `ids`, read one position at a time with adaptive exit."""
    from pipeline.eval.decode import DecodeLoop
    from pipeline.eval.generate import GenerationConfig

    device = model_device(model)
    cfg = GenerationConfig(r=max_r, exit_rule=rule, max_new_tokens=0, **cfg_kw)
    loop = DecodeLoop(model, cfg, batch=1, capacity=len(ids), device=device)
    depths, warm = [], None
    for offset, tok in enumerate(ids):
        ids_BS = torch.tensor([[tok]], device=device)
        _, last_SBH, depth = loop.step(ids_BS, offset, warm, adaptive=True)
        depths.append(depth)
        warm = last_SBH if cfg.continuous_cot else None
    return depths


def summarize(depths: list[int]) -> dict:
    hist = Counter(depths)
    return {
        "tokens": len(depths),
        "mean_depth": sum(depths) / len(depths) if depths else 0.0,
        "histogram": {str(d): hist[d] for d in sorted(hist)},
        "depths": depths,
    }


def depths_by_category(
    model,
    encode,
    texts: dict[str, list[str]],
    rule,
    max_r: int,
    *,
    max_tokens: int = 256,
    state_init: str = "zero",
    seed: int = 0,
) -> dict[str, dict[str, dict]]:
    """{category: {"plain" | "cot": summarize(per-token depths)}}; `encode(text) -> ids`, each
    text cut to its first `max_tokens` tokens."""
    out: dict[str, dict[str, dict]] = {}
    with _EvalMode(model):
        for category, items in texts.items():
            per = {}
            for cond in CONDITIONS:
                kw = dict(state_init=state_init, seed=seed, continuous_cot=cond == "cot")
                depths: list[int] = []
                for text in items:
                    ids = encode(text)[:max_tokens]
                    if ids:
                        depths += token_exit_depths(model, ids, rule, max_r, kw)
                per[cond] = summarize(depths)
            out[category] = per
    return out
