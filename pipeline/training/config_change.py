"""Continuing a run with a changed config: what is allowed, what needs saying, what is refused.

    problems = check_continuation(old_resolved, new_resolved, allow=["train.global_batch_size"])

`rdpt train` (on the run's resolved.yaml, before anything is written) and `rdpt submit` (before
anything is queued) both call it when the run directory already has a checkpoint. Every key
that differs gets one of three verdicts, and the message names the key, the old and the new
value and, where there is one, the flag that accepts it (`--allow-change KEY`):

- free: nothing of the run's state depends on it (logging, tracking, checkpoint cadence,
  evaluation, test knobs, run length: the schedule is a function of the step);
- exact with consent: the run continues exactly from where it stopped, but what follows
  differs from an uninterrupted run; the message says how (e.g. a new global batch: the loader
  continues with the next unseen sequence of the same order, each later step sees the new
  number of sequences);
- refused: the checkpoint cannot be continued that way (another model, dataset or tensor-
  parallel size; another ZeRO stage or data-parallel size under ZeRO >= 1, whose optimizer
  partitions differ).
"""

from __future__ import annotations

from pipeline.common.config_io import flatten

FREE = (
    "train.max_steps",
    "train.log_interval",
    "train.max_nonfinite_steps",
    "train.compile",
    "train.micro_batch_size",  # the same sequences per step, accumulated in other chunks
    "parallel.activation_checkpointing",
    "checkpoint.",
    "tracking.",
    "eval.",
    "debug.",
    "run.name",
    "run.dir",  # a run directory that was moved or copied continues as it was
    "telemetry.",
    "model.loss_chunk_tokens",  # how the loss is sliced, not what it is
    "model.init.",  # how a new model is initialised (r-bar): a continued run loads its weights
)
REFUSED = {
    "model.": "the checkpoint holds another model",
    "data.path": "the loader's position refers to another dataset",
    "parallel.tp": "the checkpoint is sharded for another tensor-parallel size",
    "train.stage": "another training stage needs its own run",
}
CONSENT = {
    "train.global_batch_size": (
        "the loader continues with the next unseen sequence of the same order; every later "
        "step takes the new number of sequences (the lr schedule and the r draws stay "
        "functions of the step)"
    ),
    "optim.": "later steps use the new optimizer settings from the restored optimizer state",
    "recurrence.": "later steps draw r (and split it) with the new settings",
    "run.seed": "later data epochs and initial states follow the new seed",
    "data.shuffle": "later epochs are read in the new order",
    "train.precision": "later steps compute in the new precision",
    "coconut.": "later steps follow the new continuous-thought curriculum",
    "data.pause.": "later rows get the new pause tokens",
    "data.reasoning_steps": "later rows keep or drop the language steps differently",
}
# Sections added to the schema after runs existed: a run resolved before them continues when
# the new config leaves them at their defaults.
ADDED_LATER = ("coconut.", "data.pause.", "data.reasoning_steps")


def _match(key: str, patterns) -> str | None:
    for p in patterns:
        if key == p or (p.endswith(".") and key.startswith(p)):
            return p
    return None


def check_continuation(old: dict, new: dict, allow=()) -> list[str]:
    """Problems continuing a run resolved as `old` with the config `new` (resolved dicts);
    [] when it may continue. `allow`: keys (or section prefixes) the user accepts."""
    a, b = flatten(old), flatten(new)
    problems = []
    for key in sorted(a.keys() | b.keys()):
        was, now = a.get(key), b.get(key)
        if was == now or _match(key, FREE):
            continue
        if key not in a and _match(key, ADDED_LATER) and now == _defaults().get(key):
            continue
        if key in ("parallel.nproc", "parallel.zero_stage"):
            stage = b.get("parallel.zero_stage")
            if key == "parallel.nproc" and stage == 0 == a.get("parallel.zero_stage"):
                continue  # plain data parallel: every rank holds all of it; same sample order
            problems.append(
                f"{key}: {was!r} -> {now!r}: refused, the optimizer state is partitioned over "
                f"the data-parallel ranks under ZeRO >= 1 (keep the layout, or start a new run)"
            )
            continue
        refused = _match(key, REFUSED)
        if refused:
            problems.append(f"{key}: {was!r} -> {now!r}: refused, {REFUSED[refused]}")
            continue
        consent = _match(key, CONSENT)
        why = CONSENT[consent] if consent else "the rest of the run differs from the first part"
        if _match(key, allow):
            continue
        problems.append(f"{key}: {was!r} -> {now!r}: {why}; accept with --allow-change {key}")
    return problems


def _defaults() -> dict:
    from pipeline.training.config import TrainConfig

    return flatten(TrainConfig().model_dump(mode="json"))
