"""Convert between the Hugging Face Huginn layout (huginn-0125) and rdpt's consolidated
checkpoint (consolidated.py). Pure tensor re-indexing; no model is built.

HF names: transformer.wte, transformer.{prelude.i | core_block.i | coda.i}.{norm_1..norm_4,
attn.Wqkv, attn.qk_bias, attn.proj, mlp.fc, mlp.proj}, transformer.adapter, transformer.ln_f,
lm_head (a copy of wte when tied), freqs_cis (RoPE table, derived; regenerated on export).

Layout differences:
- QKV: HF `Wqkv` rows are [Q | K | V], each head-major [heads, head_dim]; rdpt (megatron)
  orders rows [head, (q|k|v), head_dim] so a TP split is a split by heads.
- SwiGLU fc: both are [gate | up]; megatron splits it across TP ranks with stride 2, which
  consolidated.shard_tensor applies on load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pipeline.common.errors import RdptCheckpointError
from pipeline.model.config import ModelConfig

BLOCKS = (("prelude", "prelude_block"), ("core_block", "core_block"), ("coda", "coda_block"))
LAYER_MAP = {
    "norm_1.weight": "norm_1.weight",
    "norm_2.weight": "norm_2.weight",
    "norm_3.weight": "norm_3.weight",
    "norm_4.weight": "norm_4.weight",
    "attn.Wqkv.weight": "self_attention.linear_qkv.weight",
    "attn.qk_bias": "self_attention.qk_bias",
    "attn.proj.weight": "self_attention.linear_proj.weight",
    "mlp.fc.weight": "mlp.linear_fc1.weight",
    "mlp.proj.weight": "mlp.linear_fc2.weight",
}


def qkv_hf_to_megatron(w: torch.Tensor, heads: int) -> torch.Tensor:
    """[3*h, h] rows [Q|K|V] (head-major) -> rows [head, (q|k|v), head_dim]."""
    hd = w.shape[0] // (3 * heads)
    return w.view(3, heads, hd, -1).transpose(0, 1).reshape(w.shape)


def qkv_megatron_to_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    hd = w.shape[0] // (3 * heads)
    return w.view(heads, 3, hd, -1).transpose(0, 1).reshape(w.shape)


def _n_layers(cfg: ModelConfig) -> dict[str, int]:
    return {"prelude": cfg.n_prelude, "core_block": cfg.n_core, "coda": cfg.n_coda}


# ------------------------------------------------------------------ config.json
def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a Huginn config.json (accepts n_embd/hidden_size, n_heads/
    num_attention_heads, ...)."""

    def get(*keys, default=None):
        for k in keys:
            if k in hf:
                return hf[k]
        if default is None:
            raise RdptCheckpointError(f"config.json: missing key {keys[0]!r}")
        return default

    return ModelConfig(
        vocab_size=get("padded_vocab_size", "vocab_size"),
        hidden_size=get("n_embd", "hidden_size"),
        num_heads=get("n_heads", "num_attention_heads"),
        ffn_hidden_size=get("intermediate_size"),
        n_prelude=get("n_layers_in_prelude"),
        n_core=get("n_layers_in_recurrent_block"),
        n_coda=get("n_layers_in_coda"),
        max_seq_len=get("block_size", "max_position_embeddings", default=4096),
        norm_eps=get("norm_eps", default=1e-6),
        qk_bias=get("qk_bias", default=True),
        rope_base=get("rope_base", default=50000.0),
        tie_embeddings=get("tie_embeddings", "tie_word_embeddings", default=True),
        layer_type="sandwich",
    )


def config_to_hf(cfg: ModelConfig, mean_recurrence: float = 32, backprop_depth: int = 8) -> dict:
    """config.json of the HF Huginn layout; mean_recurrence / mean_backprop_depth are the r̄
    and k the model was trained with (the HF code's default number of iterations). No
    `tie_word_embeddings`: the published config class derives it from tie_embeddings and
    fails on a second value."""
    return {
        "architectures": ["RavenForCausalLM"],
        "model_type": "huginn_raven",
        "n_embd": cfg.hidden_size,
        "n_heads": cfg.num_heads,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_hidden_size,
        "vocab_size": cfg.vocab_size,
        "padded_vocab_size": cfg.vocab_size,
        "n_layers": cfg.n_layers_total,
        "n_layers_in_prelude": cfg.n_prelude,
        "n_layers_in_recurrent_block": cfg.n_core,
        "n_layers_in_coda": cfg.n_coda,
        "block_size": cfg.max_seq_len,
        "norm_eps": cfg.norm_eps,
        "rope_base": cfg.rope_base,
        "qk_bias": cfg.qk_bias,
        "bias": False,
        "tie_embeddings": cfg.tie_embeddings,
        "mean_recurrence": int(mean_recurrence)
        if float(mean_recurrence).is_integer()
        else mean_recurrence,
        "mean_backprop_depth": backprop_depth,
        "torch_dtype": "float32",
    }


def freqs_cis_table(cfg: ModelConfig) -> torch.Tensor:
    """The RoPE table HF checkpoints carry as `freqs_cis`: [1, block_size, 1, head_dim/2, 2]
    (cos, sin) in fp32 (safetensors has no complex dtype), the shape of the published checkpoint
    and of the buffer its modeling code registers."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv)
    return torch.stack([torch.cos(ang), torch.sin(ang)], dim=-1)[None, :, None]


# ------------------------------------------------------------------ state dicts
def hf_to_rdpt(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Huginn tensors -> rdpt consolidated (megatron, TP-unsharded) tensors."""
    if cfg.layer_type != "sandwich":
        raise RdptCheckpointError("model.layer_type: the HF Huginn layout has sandwich layers only")
    out = {"embedding.weight": hf_sd["transformer.wte.weight"]}
    for hf_block, rd_block in BLOCKS:
        for i in range(_n_layers(cfg)[hf_block]):
            for hf_name, rd_name in LAYER_MAP.items():
                key = f"transformer.{hf_block}.{i}.{hf_name}"
                if hf_name == "attn.qk_bias" and not cfg.qk_bias:
                    continue
                if key not in hf_sd:
                    raise RdptCheckpointError(f"HF checkpoint: tensor {key!r} missing")
                t = hf_sd[key]
                if hf_name == "attn.Wqkv.weight":
                    t = qkv_hf_to_megatron(t, cfg.num_heads)
                out[f"{rd_block}.{i}.{rd_name}"] = t
    out["adapter.weight"] = hf_sd["transformer.adapter.weight"]
    out["ln_f.weight"] = hf_sd["transformer.ln_f.weight"]
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = hf_sd["lm_head.weight"]
    elif "lm_head.weight" in hf_sd and not torch.equal(
        hf_sd["lm_head.weight"], out["embedding.weight"]
    ):
        raise RdptCheckpointError(
            "HF checkpoint: tie_embeddings is true but lm_head.weight differs from transformer.wte"
        )
    return {k: v.contiguous() for k, v in out.items()}


def rdpt_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """rdpt consolidated tensors -> HF Huginn tensors (lm_head as a copy when tied)."""
    if cfg.layer_type != "sandwich":
        raise RdptCheckpointError("model.layer_type: the HF Huginn layout has sandwich layers only")
    out = {"transformer.wte.weight": sd["embedding.weight"]}
    for hf_block, rd_block in BLOCKS:
        for i in range(_n_layers(cfg)[hf_block]):
            for hf_name, rd_name in LAYER_MAP.items():
                key = f"{rd_block}.{i}.{rd_name}"
                if key not in sd:
                    if hf_name == "attn.qk_bias" and not cfg.qk_bias:
                        continue
                    raise RdptCheckpointError(f"rdpt checkpoint: tensor {key!r} missing")
                t = sd[key]
                if hf_name == "attn.Wqkv.weight":
                    t = qkv_megatron_to_hf(t, cfg.num_heads)
                out[f"transformer.{hf_block}.{i}.{hf_name}"] = t
    out["transformer.adapter.weight"] = sd["adapter.weight"]
    out["transformer.ln_f.weight"] = sd["ln_f.weight"]
    head = sd["embedding.weight"] if cfg.tie_embeddings else sd["output_layer.weight"]
    out["lm_head.weight"] = head.clone()
    out["freqs_cis"] = freqs_cis_table(cfg)
    return {k: v.contiguous() for k, v in out.items()}


# ------------------------------------------------------------------ files
def read_hf_dir(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, all tensors) of an HF model directory (single or sharded
    safetensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise RdptCheckpointError(f"{path}: no config.json (not a Hugging Face model directory)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise RdptCheckpointError(f"{path}: no *.safetensors files")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return json.loads(cfg_file.read_text(encoding="utf-8")), sd


def write_hf_dir(
    sd: dict[str, torch.Tensor],
    hf_config: dict,
    out: str | os.PathLike,
    extra_files: dict | None = None,
) -> Path:
    """An HF Huginn directory: model.safetensors, config.json and `extra_files` ({name: path},
    e.g. tokenizer.json), built under a temporary name."""
    import shutil

    from safetensors.torch import save_file

    from pipeline.common.atomic import atomic_directory

    out = Path(out)
    if out.exists():
        raise RdptCheckpointError(f"{out}: already exists (refusing to overwrite)")
    with atomic_directory(out) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
    return out


def convert_from_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """HF Huginn directory -> rdpt consolidated checkpoint directory."""
    from pipeline.model.consolidated import write_consolidated

    hf_cfg, hf_sd = read_hf_dir(hf_dir)
    cfg = config_from_hf(hf_cfg)
    return write_consolidated(
        hf_to_rdpt(hf_sd, cfg),
        cfg,
        out_dir,
        recurrence_from_hf(hf_cfg),
        extra_files=tokenizer_files(hf_dir),
    )


def tokenizer_files(path: str | os.PathLike) -> dict:
    """{"tokenizer.json": path} when the directory has one (it travels with the weights)."""
    tok = Path(path) / "tokenizer.json"
    return {"tokenizer.json": tok} if tok.is_file() else {}


def recurrence_from_hf(hf: dict) -> dict | None:
    """{mean_recurrence, mean_backprop_depth} of a Huginn config.json (None when absent)."""
    if "mean_recurrence" not in hf:
        return None
    return {
        "mean_recurrence": hf["mean_recurrence"],
        "mean_backprop_depth": hf.get("mean_backprop_depth", 8),
    }


def convert_to_hf(ckpt: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """rdpt consolidated checkpoint directory -> HF Huginn directory."""
    from pipeline.model.consolidated import load_consolidated, read_recurrence

    cfg, sd = load_consolidated(ckpt)
    if cfg.exit_gate:  # the Huginn layout has no place for it
        import logging

        logging.getLogger("rdpt.export").warning(
            "%s: the exit gate (model.exit_gate) is not part of the Hugging Face Huginn layout "
            "and is left out; --exit-criterion gate needs the rdpt checkpoint",
            ckpt,
        )
    trained = read_recurrence(ckpt) or {}
    hf_cfg = config_to_hf(
        cfg,
        mean_recurrence=trained.get("mean_recurrence", 32),
        backprop_depth=trained.get("mean_backprop_depth", 8),
    )
    return write_hf_dir(rdpt_to_hf(sd, cfg), hf_cfg, out_dir, extra_files=tokenizer_files(ckpt))
