"""Shared basics every other part of rdpt builds on (layer 0: imports nothing else of rdpt).

errors.py        RdptError hierarchy: every user-caused error names the file, key or value
exitcodes.py     process exit codes with a meaning for launchers (0, 2, 85 requeue, 86 abort)
atomic.py        crash-safe writes (temp name + fsync + rename), sha256 of files
config_io.py     the one config system: YAML + includes + dotted overrides -> pydantic schema
cli_args.py      argparse pieces shared by commands (overrides after options)
stop_signals.py  SIGUSR1/SIGTERM remembered from the first instant of a training process
slurm_env.py     this process's rank from srun's variables, as torchrun variables
distributed.py   torch.distributed process group from the environment (gloo / NCCL)
mfu.py           model FLOPs utilisation and the device peak table (training, bench, runs)
"""
