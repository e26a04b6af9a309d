"""`rdpt model-info` (parameters per part, FLOPs per token) and `rdpt convert` (Hugging Face
Huginn layout <-> rdpt consolidated checkpoint)."""

from __future__ import annotations

import argparse
import json

INFO_EPILOG = """\
examples:
  rdpt model-info configs/model/huginn-3.5b.yaml
  rdpt model-info configs/model/bench-0.7b.yaml --r 32 --k 8 --seq-len 4096
  rdpt model-info configs/model/tiny.yaml vocab_size=1024 --json"""

CONVERT_EPILOG = """\
examples:
  rdpt convert --from-hf hf/huginn-0125 ckpt/huginn-rdpt     # HF dir -> rdpt checkpoint
  rdpt convert --to-hf ckpt/huginn-rdpt hf/huginn-export      # rdpt checkpoint -> HF dir

An rdpt checkpoint here is a consolidated directory (model.safetensors with the TP-unsharded
megatron state dict + model.yaml); any tensor-parallel size loads it."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "model-info",
        help="parameters per part and FLOPs per token of a model config",
        description="Count the parameters of a model config per part (prelude, core, coda, "
        "adapter, embedding) on the meta device, without allocating memory, check them "
        "against the closed-form formulas, and print the FLOPs per token of a training "
        "step with r iterations of which the last k carry gradients.",
        epilog=INFO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="model YAML (e.g. configs/model/huginn-3.5b.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. vocab_size=1024")
    p.add_argument("--r", type=int, default=32, help="core iterations (default 32)")
    p.add_argument("--k", type=int, default=8, help="iterations with gradients (default 8)")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length (default 4096)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=model_info)

    c = subparsers.add_parser(
        "convert",
        help="convert Hugging Face Huginn checkpoints to/from rdpt",
        description="Convert between the Hugging Face Huginn layout (config.json + "
        "safetensors, names transformer.wte / prelude / core_block / coda / adapter / ln_f / "
        "lm_head) and rdpt's consolidated checkpoint. A round trip is bitwise.",
        epilog=CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--from-hf", metavar="HF_DIR", help="Hugging Face model directory to import")
    g.add_argument("--to-hf", metavar="CKPT", help="rdpt consolidated checkpoint to export")
    c.add_argument("out", help="output directory (must not exist)")
    c.set_defaults(func=convert)


def model_info(args) -> int:
    from megatron.core import parallel_state

    from pipeline.common.config_io import load_config
    from pipeline.model.config import ModelConfig
    from pipeline.model.counting import closed_form_parameters, count_parameters_meta
    from pipeline.model.flops import flops_per_token, forward_flops_per_token
    from pipeline.model.runtime import destroy_model_parallel, init_model_parallel

    cfg = load_config(ModelConfig, args.config, args.overrides)
    owns_state = not parallel_state.model_parallel_is_initialized()
    if owns_state:
        init_model_parallel(tp=1)
    elif parallel_state.get_tensor_model_parallel_world_size() != 1:
        from pipeline.common.errors import RdptConfigError

        raise RdptConfigError("model-info: counts need tp=1 (parallel_state has another tp)")
    try:
        counts = count_parameters_meta(cfg)
    finally:
        if owns_state:
            destroy_model_parallel()
    formula = closed_form_parameters(cfg)
    train_f = flops_per_token(cfg, args.r, args.k, args.seq_len)
    fwd_f = forward_flops_per_token(cfg, args.r, args.seq_len)
    info = {
        "config": str(args.config),
        "parameters": counts,
        "parameters_match_formula": counts == formula,
        "r": args.r,
        "k": args.k,
        "seq_len": args.seq_len,
        "train_flops_per_token": train_f,
        "forward_flops_per_token": fwd_f,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"{args.config}: h={cfg.hidden_size} heads={cfg.num_heads}x{cfg.head_dim} "
        f"ffn={cfg.ffn_hidden_size} vocab={cfg.vocab_size} layers "
        f"{cfg.n_prelude}/{cfg.n_core}/{cfg.n_coda} ({cfg.layer_type})"
    )
    for part, n in counts.items():
        if part == "total":
            continue
        print(f"  {part:<12} {n:>16,}")
    tied = " (tied embeddings)" if cfg.tie_embeddings else ""
    print(f"  {'total':<12} {counts['total']:>16,} unique parameters{tied}")
    print(f"  closed-form formula agrees: {counts == formula}")
    print(
        f"FLOPs per token at seq_len {args.seq_len}: training r={args.r} k={args.k}: "
        f"{_fmt(train_f)}; forward r={args.r}: {_fmt(fwd_f)}"
    )
    return 0 if counts == formula else 1


def _fmt(flops: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:,.2f} {unit}"
    return f"{flops:,.0f} FLOP"


def convert(args) -> int:
    from pipeline.model.hf_convert import convert_from_hf, convert_to_hf

    if args.from_hf:
        out = convert_from_hf(args.from_hf, args.out)
        print(f"wrote rdpt checkpoint {out}")
    else:
        out = convert_to_hf(args.to_hf, args.out)
        print(f"wrote Hugging Face directory {out}")
    return 0
