"""Training (layer 3): everything `pipeline/train.py` assembles.

config.py      TrainConfig (the run schema) and resolve(): the one place a config meets
               the world size and the dataset
recurrence.py  the per-step draw of r (pure function of seed and step)
schedules.py   learning-rate schedules (pure functions of the step)
parallel.py    ParallelDims and parallelize(): TP, ZeRO-3 construction, activation
               checkpointing, compile and the DeepSpeed wrap, in one order
engine.py      the DeepSpeed config and optimizer built from TrainConfig
checkpoint.py  crash-safe, verified checkpoints and their trainer state
validation.py  in-training validation loss at several r
"""
