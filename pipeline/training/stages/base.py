"""The `Stage` record every training stage fills in (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _keep(model, cfg):
    return model


@dataclass(frozen=True)
class Stage:
    """A training stage (see the module docstring)."""

    name: str
    step: Callable[..., Any]
    """(engine, batches, step, *, r, n_grad, ctx, hooks) -> training.step.StepResult"""
    loader: Callable[[Any, Any], Any]
    """(cfg, dims) -> an iterable with state_dict()/load_state_dict()/close(): one item (the
    micro-batches of this rank) per optimizer step"""
    prepare_model: Callable[[Any, Any], Any] = _keep
    """(model, cfg) -> model, before the DeepSpeed wrap: freeze parameters, add heads"""
