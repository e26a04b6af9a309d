"""Parameter counts per part: measured on the meta device (nothing allocated) and in closed
form, so presets can be checked against the formulas."""

from __future__ import annotations

from pipeline.model.config import ModelConfig

PARTS = ("embedding", "prelude", "adapter", "core", "coda", "final_norm", "head", "exit_gate")


def closed_form_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Unique parameters per part from the formulas (TP-unsharded)."""
    h, f, V = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    norms = 4 if cfg.layer_type == "sandwich" else 2
    layer = 3 * h * h + h * h + 2 * f * h + f * h + norms * h + (2 * h if cfg.qk_bias else 0)
    counts = {
        "embedding": V * h,
        "prelude": cfg.n_prelude * layer,
        "adapter": 2 * h * h,
        "core": cfg.n_core * layer,
        "coda": cfg.n_coda * layer,
        "final_norm": h,
        "head": 0 if cfg.tie_embeddings else V * h,
        "exit_gate": 2 * h + 1 if cfg.exit_gate else 0,  # norm, projection and its bias
    }
    counts["total"] = sum(counts[p] for p in PARTS)
    return counts


def _part_of(name: str) -> str:
    head = name.split(".", 1)[0]
    return {
        "embedding": "embedding",
        "prelude_block": "prelude",
        "adapter": "adapter",
        "core_block": "core",
        "coda_block": "coda",
        "ln_f": "final_norm",
        "output_layer": "head",
        "exit_gate": "exit_gate",
    }[head]


def count_parameters(model) -> dict[str, int]:
    """Unique parameters per part of a built model (this TP rank's shards)."""
    counts = {p: 0 for p in PARTS}
    for name, p in model.named_parameters():  # named_parameters() yields shared tensors once
        counts[_part_of(name)] += p.numel()
    counts["total"] = sum(counts[p] for p in PARTS)
    return counts


def count_parameters_meta(cfg: ModelConfig) -> dict[str, int]:
    """Build the model on the meta device (parallel_state must be initialised, tp=1 for the
    full counts) and count its parameters per part without allocating memory."""
    import torch

    from pipeline.model.build import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    return count_parameters(model)
