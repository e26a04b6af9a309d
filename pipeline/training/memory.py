"""Per-GPU memory estimate of a training layout (`rdpt train --dry-run`), before any GPU is
asked for.

    est = estimate_memory(cfg, dims, seq_len=4096)
    print(format_estimate(est, cfg, dims, gpu_gb=80))
    check_fits(est, cfg, dims, gpu_gb=80)        # RdptConfigError saying what to change

The model (bytes per GPU; N = parameters on this GPU = the TP shard, norms replicated):

- weights: bf16 copy 2N plus the fp32 master copy 4N (fp32 training: 4N, no second copy);
- gradients: 2N in bf16 (4N in fp32). Mixed precision at ZeRO 1-3 accumulates them in fp32
  (engine.py): ZeRO-1 keeps a whole fp32 accumulation buffer (4N) next to the bf16 gradients
  (2N); ZeRO 2 and 3 reduce into fp32 partitions (4N / dp) and free the bf16 ones;
- optimizer moments (Adam-like, m and v in fp32): 8N;
- ZeRO partitions over the data-parallel size dp: stage 1 the master copy and the moments,
  stage 2 also the gradients, stage 3 also the bf16 weights (with fp32 accumulation
  16N -> 12N + 8N/dp -> 2N + 16N/dp -> 18N/dp of mixed-precision Adam).
- activations per micro-batch of b sequences of s tokens, in the compute dtype: one sandwich
  layer keeps what its backward reads, 10h + 3f values per token (norm inputs, q/k/v, the
  attention output, projection inputs, [gate|up] and the SwiGLU output; flash/SDPA attention
  keeps no s x s matrix). The prelude, the coda and the k graded core iterations keep theirs
  (the r - k iterations without gradients keep nothing); the adapter reads 2h per graded
  iteration; the loss keeps fp32 logits (4V bytes per token) plus the compute-dtype copy.
  With `parallel.activation_checkpointing` a graded iteration keeps only its input state (h
  per token) and one iteration's activations are alive at a time during backward.
- a 10% allowance for the allocator and temporary buffers, on top of the sum.

It is an estimate from shapes: fragmentation, NCCL buffers and compiled-graph workspaces vary
by setup. The numbers are what rdpt refuses or accepts on; a real run's peak is in the
metrics (MFU/memory, issue 11).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.common.errors import RdptConfigError

GB = 1e9  # decimal, as GPU memory is sold (80 GB, 141 GB)
OVERHEAD = 0.10
GPU_SIZES_GB = (80, 141)  # H100/A100-80GB, H200


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, by item."""

    params_local: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_recompute: float
    activations_no_recompute: float
    recompute: bool
    seq_len: int

    @property
    def states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return (self.states + self.activations) * (1 + OVERHEAD)

    def total_with(self, recompute: bool) -> float:
        act = self.activations_recompute if recompute else self.activations_no_recompute
        return (self.states + act) * (1 + OVERHEAD)


def local_parameters(model_cfg, tp: int) -> int:
    """Parameters on one GPU: the TP shard of every matrix and bias, norms replicated."""
    from pipeline.model.counting import closed_form_parameters

    total = closed_form_parameters(model_cfg)["total"]
    h = model_cfg.hidden_size
    norms_per_layer = 4 if model_cfg.layer_type == "sandwich" else 2
    layers = model_cfg.n_prelude + model_cfg.n_core + model_cfg.n_coda
    replicated = layers * norms_per_layer * h + h  # + ln_f
    return (total - replicated) // tp + replicated


def activation_bytes(
    model_cfg, *, micro_batch: int, seq_len: int, k: int, tp: int, act_bytes: int, recompute: bool
) -> float:
    """Activation memory of one micro-batch with k graded core iterations (see module doc)."""
    h, f, V = model_cfg.hidden_size, model_cfg.ffn_hidden_size, model_cfg.vocab_size
    tokens = micro_batch * seq_len
    # per layer and token; the TP-split parts (q/k/v, attention output, fc1/fc2) shard by tp
    layer = (6 * h + (4 * h + 3 * f) / tp) * act_bytes
    once = (model_cfg.n_prelude + model_cfg.n_coda) * layer + 2 * h * act_bytes  # + e, s_0
    logits = V / tp * (4 + act_bytes)
    if recompute:
        core = k * h * act_bytes + model_cfg.n_core * layer + 2 * h * act_bytes  # inputs + replay
    else:
        core = k * (model_cfg.n_core * layer + 2 * h * act_bytes)
    return tokens * (once + core + logits)


def estimate_memory(cfg, dims, seq_len: int) -> MemoryEstimate:
    """The per-GPU estimate of `cfg` on layout `dims` (training.parallel.ParallelDims)."""
    mixed = cfg.train.precision != "fp32"  # auto computes in bf16 on a GPU
    n = local_parameters(cfg.model, dims.tp)
    dp, stage = dims.dp, cfg.parallel.zero_stage
    low = 2 * n if mixed else 0  # the bf16 compute copy
    master = 4 * n
    grads = (2 if mixed else 4) * n
    if mixed and stage == 1:  # bf16 gradients + DeepSpeed's whole fp32 accumulation buffer
        grads = 2 * n + 4 * n
    elif mixed and stage >= 2:  # reduced into fp32 partitions
        grads = 4 * n
    moments = 8 * n
    weights = (low / dp if stage >= 3 else low) + (master / dp if stage >= 1 else master)
    if not mixed:  # fp32: the master copy is the model (partitioned only at stage 3)
        weights = master / dp if stage >= 3 else master
    gradients = grads / dp if stage >= 2 else grads
    optimizer = moments / dp if stage >= 1 else moments
    k = min(cfg.recurrence.backprop_depth, cfg.recurrence.max_r or cfg.recurrence.backprop_depth)
    act = dict(
        micro_batch=cfg.train.micro_batch_size,
        seq_len=seq_len,
        k=k,
        tp=dims.tp,
        act_bytes=2 if mixed else 4,
    )
    with_rc = activation_bytes(cfg.model, recompute=True, **act)
    without = activation_bytes(cfg.model, recompute=False, **act)
    rc = cfg.parallel.activation_checkpointing
    return MemoryEstimate(
        params_local=n,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=with_rc if rc else without,
        activations_recompute=with_rc,
        activations_no_recompute=without,
        recompute=rc,
        seq_len=seq_len,
    )


def _gb(x: float) -> str:
    return f"{x / GB:7.1f} GB"


def format_estimate(est: MemoryEstimate, cfg, dims, gpu_gb: float, nodes: int | None = None) -> str:
    """The table `rdpt train --dry-run` prints."""
    per_node = dims.world_size // nodes if nodes else None
    layout = f"{dims.world_size} GPUs" + (f" = {nodes} node(s) x {per_node}" if nodes else "")
    tokens = cfg.train.global_batch_size * est.seq_len
    lines = [
        f"# Layout: {layout}; tp {dims.tp} x dp {dims.dp}",
        f"# Global batch: {cfg.train.global_batch_size} sequences = micro-batch "
        f"{dims.micro_batch_size} x dp {dims.dp} x accumulation {dims.grad_accum} "
        f"({tokens:,} tokens per step)",
        f"# Memory per GPU (estimate; ZeRO-{cfg.parallel.zero_stage}, "
        f"{est.params_local:,} parameters on each GPU):",
        f"#   weights                 {_gb(est.weights)}",
        f"#   gradients               {_gb(est.gradients)}",
        f"#   optimizer state         {_gb(est.optimizer)}",
        f"#   activations, recompute  {_gb(est.activations_recompute)}"
        + ("   <- parallel.activation_checkpointing=true" if est.recompute else ""),
        f"#   activations, stored     {_gb(est.activations_no_recompute)}"
        + ("" if est.recompute else "   <- parallel.activation_checkpointing=false"),
        f"#   total (+{OVERHEAD:.0%} allowance)   {_gb(est.total)} of {gpu_gb:g} GB per GPU",
    ]
    return "\n".join(lines)


def check_fits(est: MemoryEstimate, cfg, dims, gpu_gb: float) -> None:
    """RdptConfigError when the estimate exceeds `gpu_gb`, naming changes that would fit."""
    limit = gpu_gb * 1e9
    if est.total <= limit:
        return
    hints = []
    if not est.recompute and est.total_with(True) <= limit:
        hints.append(f"parallel.activation_checkpointing=true ({est.total_with(True) / GB:.1f} GB)")
    stage = cfg.parallel.zero_stage
    for s in range(stage + 1, 4):
        alt = cfg.model_copy(deep=True)
        alt.parallel.zero_stage = s
        alt.parallel.activation_checkpointing = True
        e = estimate_memory(alt, dims, est.seq_len)
        if e.total <= limit:
            hints.append(
                f"parallel.zero_stage={s} with activation checkpointing ({e.total / GB:.1f} GB)"
            )
            break
    if cfg.train.micro_batch_size > 1:
        hints.append("a smaller train.micro_batch_size (more accumulation, same global batch)")
    if stage >= 1:
        hints.append("more GPUs (a larger dp divides the ZeRO-partitioned state)")
    if dims.tp == 1:
        hints.append("parallel.tp=2 or more (splits weights and activations)")
    if gpu_gb < max(GPU_SIZES_GB):
        hints.append(f"a {max(GPU_SIZES_GB)} GB GPU (--gpu-mem {max(GPU_SIZES_GB)})")
    raise RdptConfigError(
        f"this layout needs about {est.total / GB:.1f} GB per GPU (weights "
        f"{est.weights / GB:.1f}, gradients {est.gradients / GB:.1f}, optimizer "
        f"{est.optimizer / GB:.1f}, activations {est.activations / GB:.1f}) and does not "
        f"fit a {gpu_gb:g} GB GPU; change one of: " + "; ".join(hints)
    )
