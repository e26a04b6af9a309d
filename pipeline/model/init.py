"""Weight initialisation of the recurrent-depth model (megatron's `init_method` contract: a
function that fills a tensor in place).

    init_ = normal_init(cfg.resolved_init_std)
"""

from __future__ import annotations


def normal_init(std: float):
    """Weight initialiser N(0, std)."""
    import torch

    def init_(t):
        return torch.nn.init.normal_(t, mean=0.0, std=std)

    return init_
