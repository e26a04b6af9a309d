"""What a training run carries from one step to the next, and what it must agree with to resume.

    state = TrainerState()                           # or TrainerState.from_json(saved)
    state.record(result, tokens=cfg.train.global_batch_size * seq_len)
    identity = run_identity(cfg, dims, dataset)      # saved next to the state in a checkpoint

`TrainerState` is the loop's whole mutable state besides the engine (weights, optimizer) and
the loader (its cursor is saved with it): a checkpoint restores exactly this object.
`run_identity` is what a resumed run must match: the dataset, the model, the parallel layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainerState:
    """Counters of a run (all ranks hold the same values)."""

    step: int = 0
    """Optimizer steps completed (the next step to run)."""
    tokens: int = 0
    """Tokens trained on (skipped steps included: their data was consumed)."""
    skipped_steps: int = 0
    """Non-finite steps skipped in total."""
    nonfinite_in_a_row: int = 0
    """Non-finite steps since the last good one (train.max_nonfinite_steps stops the run)."""
    loader: dict[str, Any] = field(default_factory=dict)
    """The data loader's cursor after `step` steps (ResumableLoader.state_dict())."""

    def record(self, result, tokens: int) -> None:
        """Count one finished optimizer step (a train_step StepResult)."""
        self.step += 1
        self.tokens += tokens
        if result.nonfinite:
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
        else:
            self.nonfinite_in_a_row = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, saved: dict[str, Any], tokens_per_step: int) -> TrainerState:
        """The state of a checkpoint's trainer_state.json (older files lack some counters)."""
        step = int(saved["step"])
        return cls(
            step=step,
            tokens=int(saved.get("tokens", step * tokens_per_step)),
            skipped_steps=int(saved.get("skipped_steps", 0)),
            nonfinite_in_a_row=int(saved.get("nonfinite_in_a_row", 0)),
            loader=dict(saved.get("loader", {})),
        )


def run_identity(cfg, dims, dataset) -> dict[str, Any]:
    """What a checkpoint records about the run it belongs to (compared on resume; also what an
    export needs to know: the recurrence the model was trained with)."""
    return {
        "manifest_sha256": dataset.manifest_sha256,
        "data_path": str(cfg.data.path),
        "model_config": cfg.model.model_dump(mode="json"),
        "recurrence": cfg.recurrence.model_dump(mode="json"),
        "parallel": {"tp": dims.tp, "dp": dims.dp, "zero_stage": cfg.parallel.zero_stage},
    }
