"""Training (layer 3): everything `pipeline/train.py` assembles, one job per module.

config.py      TrainConfig: the run schema (YAML + dotted overrides)
resolve.py     resolve(cfg, world): the one place a config meets the world size and the dataset
layout.py      ParallelDims: tp x dp x accumulation, the only layout validator
parallel.py    parallelize(): TP, ZeRO-3 construction, init_from, activation checkpointing,
               compile and the DeepSpeed wrap, in one order
engine.py      the DeepSpeed config and engine built from TrainConfig
platform.py    Platform: the machine facts the engine set-up depends on (device, prebuilt ops)
optim.py       the optimizer and its implementation (optim.impl; skips a non-finite step)
pretrained.py  weights from a run, a consolidated export or an HF directory (model.init_from)
recurrence.py  the per-step draw of r (pure function of seed and step)
schedules.py   learning-rate schedules (pure functions of the step)
stages/        train.stage: what is trained and how one optimizer step runs
step.py        one optimizer step over the micro-batches (the ranks agree in one all-reduce)
state.py       TrainerState: what the loop carries and a checkpoint restores
rank.py        this process as a rank: process group, logging, stop signals, device
metrics.py     the MLflow run and per-step metrics (throughput, MFU)
validation.py  in-training validation loss at several r
checkpoint.py  crash-safe, verified checkpoints; RunCheckpoints as the loop uses them
export.py      `rdpt export`: a checkpoint -> consolidated safetensors or the HF layout
hooks.py       observers and fault injection at fixed points of the loop (tests)
"""
