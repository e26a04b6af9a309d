"""The one place where megatron-core's CUDA assumptions and version differences are bridged.

megatron-core 0.16.1 runs on CPU (use_cpu_initialization=True, every fusion off) except for a
few spots that assume CUDA. Each bridge below is a no-op when CUDA is present:

1. `model_parallel_cuda_manual_seed` (RNG tracker): on CPU we register CPU generator states.
2. `GlobalMemoryBuffer` (CUDA allocation): only used with sequence parallelism, which rdpt
   keeps off (`transformer_config` sets sequence_parallel=False).
3. `RotaryEmbedding.get_emb` moves inv_freq to CUDA: `rope_emb` builds the same table on CPU.
4. `get_default_causal_mask` (CUDA mask): our core attention builds its own masks.
5. `Attention._allocate_memory` (CUDA KV buffers): rdpt has its own KV cache (kv_cache.py).
Also `gather_from_tensor_model_parallel_region` (and the backward of
`scatter_to_tensor_model_parallel_region`) allocate on CUDA: `gather_last_dim`, `scatter_last_dim`.
Also `dist_checkpointing` calls `torch.cuda.current_device()/synchronize()`: `cuda_shim()`.

Version differences between 0.16.1 (CPU/CI, Python 3.11) and 0.19.x (GPU images) are guarded
here too (`transformer_config`, `make_rotary`).
TransformerBlock (prelude/core/coda) needs no bridge: with sequence parallelism, fp8/fp4,
CPU offloading, CUDA graphs and full recompute off, its constructor and forward are the same in
0.16.1 and 0.19.0 (layer built with layer_number/pg_collection/vp_stage, called with keyword
arguments, `inference_context` passed through untouched) and allocate nothing on CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect

import torch

HAS_CUDA = torch.cuda.is_available()


def megatron_version() -> str:
    try:
        from megatron.core.package_info import __version__
    except ImportError:  # pragma: no cover - very old layouts
        import megatron.core

        __version__ = getattr(megatron.core, "__version__", "unknown")
    return __version__


def transformer_config(**kwargs):
    """A megatron TransformerConfig with CPU-safe defaults (all fusions off, no sequence
    parallelism); keys unknown to the installed megatron-core version are dropped."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    defaults = dict(
        use_cpu_initialization=True,
        perform_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=False,
    )
    defaults.update(kwargs)
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    return TransformerConfig(**{k: v for k, v in defaults.items() if k in known})


def model_parallel_seed(seed: int) -> None:
    """megatron's model-parallel RNG seeding (bridge 1): CUDA -> megatron's own function;
    CPU -> the same tracker, filled with CPU generator states (never forked on CPU: rdpt has no
    dropout inside tensor-parallel regions)."""
    from megatron.core import tensor_parallel
    from megatron.core.parallel_state import get_tensor_model_parallel_rank
    from megatron.core.tensor_parallel import random as tp_random

    torch.manual_seed(seed)
    if HAS_CUDA:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    tp_random.initialize_rng_tracker()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    tp_rank = get_tensor_model_parallel_rank()
    seeds = {
        tp_random._DATA_PARALLEL_RNG_TRACKER_NAME: seed,
        tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME: seed + 2718 + tp_rank,
        tp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME: seed + 1024,
    }
    for name, s in seeds.items():
        tracker.seeds_.add(s)
        tracker.states_[name] = torch.Generator().manual_seed(s).get_state()
    tracker._is_initialized = True


def make_rotary(head_dim: int, base: float):
    """megatron's RotaryEmbedding over interleaved pairs (Huginn's layout), inv_freq in fp32."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    kwargs = dict(
        kv_channels=head_dim,
        rotary_percent=1.0,
        rotary_interleaved=True,
        rotary_base=base,
        use_cpu_initialization=True,
    )
    params = inspect.signature(RotaryEmbedding.__init__).parameters
    return RotaryEmbedding(**{k: v for k, v in kwargs.items() if k in params})


def rope_emb(rotary, seq_len: int, offset: int, device: torch.device) -> torch.Tensor:
    """RoPE angle table [S, 1, 1, head_dim] (fp32) for positions offset..offset+S-1 (bridge 3:
    megatron's get_emb moves inv_freq to CUDA; on CPU we build the identical table here)."""
    if device.type == "cuda":
        return rotary(seq_len, offset=offset).to(device)
    freqs = rotary.get_freqs_non_repeated(seq_len, offset)  # [S, hd/2] fp32
    if rotary.inv_freq.device != device:
        freqs = freqs.to(device)
    emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
    return emb[:, None, None, :]


def apply_rope(t_SBNh: torch.Tensor, emb: torch.Tensor, config) -> torch.Tensor:
    """megatron's unfused apply_rotary_pos_emb (interleaved) computed in fp32, cast back."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    out = apply_rotary_pos_emb(t_SBNh.float(), emb.float(), config)
    return out.to(t_SBNh.dtype)


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim over the TP group (CPU); backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(world, dim=-1)[rank].contiguous(), None


def gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """megatron's gather_from_tensor_model_parallel_region, CPU-safe."""
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return x
    if x.is_cuda:
        return tensor_parallel.gather_from_tensor_model_parallel_region(x)
    return _GatherLastDim.apply(x, parallel_state.get_tensor_model_parallel_group())


def scatter_last_dim(x: torch.Tensor) -> torch.Tensor:
    """megatron's scatter_to_tensor_model_parallel_region (keep this rank's slice of the last
    dim; backward gathers), CPU-safe: on CPU, copy_to_tensor_model_parallel_region (backward
    all-reduce) followed by a slice gives the same gradient."""
    from megatron.core import parallel_state, tensor_parallel

    world = parallel_state.get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    if x.is_cuda:
        return tensor_parallel.scatter_to_tensor_model_parallel_region(x)
    rank = parallel_state.get_tensor_model_parallel_rank()
    x = tensor_parallel.copy_to_tensor_model_parallel_region(x)
    return x.chunk(world, dim=-1)[rank].contiguous()


@contextlib.contextmanager
def cuda_shim():
    """Make `torch.cuda.current_device()` / `synchronize()` harmless on CPU (dist_checkpointing
    calls both); a no-op with CUDA."""
    if HAS_CUDA:
        yield
        return
    saved = torch.cuda.current_device, torch.cuda.synchronize
    torch.cuda.current_device = lambda: 0  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize = saved
