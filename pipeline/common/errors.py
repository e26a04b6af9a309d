"""Exception hierarchy. Every error a user can cause is an RdptError with a message that
names the file, key or value at fault; the CLI prints it without a traceback."""


class RdptError(Exception):
    """Base class for errors caused by user input or environment (not bugs)."""


class RdptConfigError(RdptError):
    """A configuration file or override is invalid."""


class RdptDataError(RdptError):
    """Input text, a shard or a manifest is missing, corrupted or inconsistent."""


class RdptCheckpointError(RdptError):
    """A checkpoint is missing, corrupted or incompatible with the run."""


class RdptLaunchError(RdptError):
    """A job cannot be submitted as requested (Slurm, resources, layout)."""


def is_disk_full(e: BaseException) -> bool:
    """An OSError saying the file system (or the user's quota) is full."""
    import errno

    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
