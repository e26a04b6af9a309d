"""megatron-core's process-group state for the model: its tensor-parallel layers read the TP
group and the model-parallel RNG from `parallel_state`, so it must exist before a model is built.

    init_model_parallel(tp=1, seed=1234)   # after torch.distributed (made here when missing)
    model = build_model(cfg)
    destroy_model_parallel()

The training layout (data parallelism, ZeRO, checks of every degree) is the training area's
business (pipeline/training/parallel.py); this is only what building and running the model needs.
"""

from __future__ import annotations

from pipeline.common.errors import RdptConfigError


def init_model_parallel(tp: int = 1, seed: int = 0) -> None:
    """Initialise megatron parallel_state with tensor-parallel size `tp` on the existing
    torch.distributed group (a one-process group is created when none exists) and seed the
    model-parallel RNG tracker. Idempotent for the same tp."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pipeline.common.distributed import init_process_group
    from pipeline.model.compat import model_parallel_seed

    if not dist.is_initialized():
        init_process_group()
    world = dist.get_world_size()
    if tp < 1 or world % tp:
        raise RdptConfigError(f"parallel.tp: {tp} must be >= 1 and divide the world size {world}")
    if parallel_state.model_parallel_is_initialized():
        have = parallel_state.get_tensor_model_parallel_world_size()
        if have != tp:
            raise RdptConfigError(
                f"parallel.tp: parallel_state already initialised with tp={have}, asked for {tp}"
            )
    else:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_seed(seed)


def destroy_model_parallel() -> None:
    """Tear down megatron parallel_state (the torch.distributed group stays)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
