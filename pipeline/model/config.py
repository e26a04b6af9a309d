"""ModelConfig: the shape and the architectural switches of a recurrent-depth LM.

Presets live in `configs/model/*.yaml` (huginn-3.5b, bench-0.7b, tiny). Every field has a
docstring; cross-field rules are checked in `check()` and raise RdptConfigError naming the key.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import model_validator

from pipeline.common.config_io import ConfigModel
from pipeline.common.errors import RdptConfigError

STATE_INITS = ("random", "zero")  # initial latent state: truncated normal per sample id, or zeros
DEFAULT_MEAN_RECURRENCE = 32.0  # rbar when nothing says otherwise (recurrence.mean's default)


class InitConfig(ConfigModel):
    """How the output projections' init scale counts depth."""

    depth: Literal["unrolled", "physical"] = "unrolled"
    """`unrolled` (Huginn): the attention/MLP output projections get std / sqrt(2 L_eff) with
    L_eff = n_prelude + n_coda + n_core * rbar, the depth the residual stream sees at the mean
    recurrence; `physical`: L = n_prelude + n_core + n_coda, the layers that exist."""
    mean_recurrence: float | None = None
    """rbar for `unrolled`. None: `rdpt train` fills it from recurrence.mean; a model built
    without a training config uses 32."""

    @model_validator(mode="after")
    def _validate(self) -> InitConfig:
        if self.mean_recurrence is not None and self.mean_recurrence <= 0:
            raise RdptConfigError(
                f"model.init.mean_recurrence: must be > 0, got {self.mean_recurrence}"
            )
        return self


class ModelConfig(ConfigModel):
    """Recurrent-depth decoder: prelude (n_prelude layers) -> core (n_core layers, looped r
    times on a latent state) -> coda (n_coda layers) -> LM head."""

    vocab_size: int = 65536
    """Vocabulary size (the trainer sets it from the dataset manifest). Must divide by TP."""
    hidden_size: int = 5280
    """Model width h."""
    num_heads: int = 55
    """Attention heads (head_dim = hidden_size / num_heads, must be even for RoPE)."""
    ffn_hidden_size: int = 17920
    """SwiGLU inner width f (the fused fc has 2f outputs: gate first, then up)."""
    n_prelude: int = 2
    """Layers of the prelude P (run once)."""
    n_core: int = 4
    """Layers of the recurrent core R (run r times with shared weights)."""
    n_coda: int = 2
    """Layers of the coda C (run once)."""
    max_seq_len: int = 4096
    """Context length the model is built for (RoPE tables, checks)."""
    layer_type: Literal["sandwich", "prenorm"] = "sandwich"
    """`sandwich` (Huginn: x'=n2(x+Attn(n1 x)), x''=n4(x'+MLP(n3 x'))) or plain `prenorm`."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon (norm computed in fp32, weight without (1+w) offset)."""
    qk_bias: bool = True
    """Learned bias added to q and k before RoPE (Huginn's `qk_bias`)."""
    rope_base: float = 50000.0
    """RoPE base theta; rotation over interleaved pairs (2i, 2i+1), computed in fp32."""
    scale_embedding: bool = True
    """Multiply token embeddings by sqrt(hidden_size) (Huginn)."""
    tie_embeddings: bool = True
    """LM head shares the token-embedding matrix."""
    init_std: float | None = None
    """Std of the normal weight init; None = sqrt(2 / (5 h)). Output projections are
    further scaled by 1/sqrt(2 * L) with L from `init.depth`."""
    init: InitConfig = InitConfig()
    """Depth used by the output-projection scale (`init.depth`: unrolled | physical)."""
    state_init: Literal["random", "zero"] = "random"
    """Default initial latent state s0: `random` (truncated normal, per sample) or `zero`; the
    forward's `state_init` argument wins."""
    state_init_std: float | None = None
    """Std of s0's truncated normal (cut at +-3 std) before scaling; None = sqrt(2 / (5 h))."""
    state_init_scale: float | None = None
    """Factor applied to s0 after drawing; None = sqrt(h) (Huginn)."""
    init_from: str | None = None
    """Start from these weights instead of a random init: a run directory, a training
    checkpoint, a consolidated checkpoint (`rdpt export`) or a Hugging Face Huginn directory.
    Their shape must equal this config's; any TP size and ZeRO stage can load them."""
    loss_chunk_tokens: int = 2048
    """Training loss over slices of this many tokens, each recomputed in backward, so the
    full-vocabulary fp32 logits of a micro-batch never exist at once (loss.py); 0 = unfused
    (all logits at once). Does not change the result beyond summation order."""
    exit_gate: bool = False
    """Add a learned exit gate on the core state (model/exit_gate.py): the probability that a
    position may stop after each core iteration, used by `--exit-criterion gate`. Its 2h + 1
    parameters are trained only by train.stage=exit_gate, on an otherwise frozen model."""
    attention_backend: Literal["auto", "flash", "sdpa", "math"] = "auto"
    """Core attention: flash-attn, torch SDPA (cuDNN preferred on Hopper), plain math; auto
    picks flash > sdpa on CUDA, math on CPU."""

    @model_validator(mode="after")
    def _validate(self) -> ModelConfig:
        if self.loss_chunk_tokens < 0:
            raise RdptConfigError(
                f"model.loss_chunk_tokens: must be >= 0 (0 = unfused), got {self.loss_chunk_tokens}"
            )
        self.check()
        return self

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def n_layers_total(self) -> int:
        return self.n_prelude + self.n_core + self.n_coda

    @property
    def init_depth(self) -> float:
        """L of the output-projection scale std / sqrt(2 L) (see `init.depth`)."""
        if self.init.depth == "physical":
            return float(max(self.n_layers_total, 1))
        rbar = self.init.mean_recurrence or DEFAULT_MEAN_RECURRENCE
        return float(self.n_prelude + self.n_coda + self.n_core * rbar)

    @property
    def output_init_std(self) -> float:
        """Std of the attention and MLP output projections: init std / sqrt(2 L)."""
        return self.resolved_init_std / math.sqrt(2 * self.init_depth)

    @property
    def resolved_init_std(self) -> float:
        return self.init_std if self.init_std is not None else math.sqrt(2 / (5 * self.hidden_size))

    @property
    def resolved_state_std(self) -> float:
        if self.state_init_std is not None:
            return self.state_init_std
        return math.sqrt(2 / (5 * self.hidden_size))

    @property
    def resolved_state_scale(self) -> float:
        if self.state_init_scale is not None:
            return self.state_init_scale
        return math.sqrt(self.hidden_size)

    # ------------------------------------------------------------------ checks
    def check(self, tp: int = 1) -> None:
        """Raise RdptConfigError (naming the key) if the shape is inconsistent, also with TP."""
        positive = ["vocab_size", "hidden_size", "num_heads", "ffn_hidden_size", "max_seq_len"]
        for key in positive:
            if getattr(self, key) < 1:
                raise RdptConfigError(f"model.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ["n_prelude", "n_core", "n_coda"]:
            if getattr(self, key) < 0:
                raise RdptConfigError(f"model.{key}: must be >= 0, got {getattr(self, key)}")
        if self.n_core < 1:
            raise RdptConfigError(
                f"model.n_core: the recurrent core needs >= 1 layer, got {self.n_core}"
            )
        if self.hidden_size % self.num_heads:
            raise RdptConfigError(
                f"model.num_heads: {self.num_heads} heads do not divide "
                f"model.hidden_size {self.hidden_size}"
            )
        if self.head_dim % 2:
            raise RdptConfigError(
                f"model.num_heads: head_dim = hidden_size/num_heads = {self.head_dim} must be even "
                "(RoPE rotates pairs)"
            )
        if self.norm_eps <= 0:
            raise RdptConfigError(f"model.norm_eps: must be > 0, got {self.norm_eps}")
        if tp < 1:
            raise RdptConfigError(f"parallel.tp: must be >= 1, got {tp}")
        if self.num_heads % tp:
            raise RdptConfigError(
                f"parallel.tp: tensor-parallel size {tp} does not divide model.num_heads "
                f"{self.num_heads}"
            )
        if self.vocab_size % tp:
            raise RdptConfigError(
                f"parallel.tp: tensor-parallel size {tp} does not divide model.vocab_size "
                f"{self.vocab_size}"
            )
        if self.ffn_hidden_size % tp:
            raise RdptConfigError(
                f"parallel.tp: tensor-parallel size {tp} does not divide model.ffn_hidden_size "
                f"{self.ffn_hidden_size}"
            )
