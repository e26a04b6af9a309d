"""Process exit codes with a meaning for launchers (the Slurm job script reads them)."""

OK = 0
USER_ERROR = 2  # bad config / input: do not retry
REQUEUE = 85  # stopped on a preemption/time-limit signal after writing a checkpoint: requeue
NONFINITE_ABORT = 86  # too many non-finite steps in a row; last good state checkpointed
