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


class RdptDiskFullError(RdptError):
    """An output could not be written: its file system (or the user's quota) is full."""


def is_disk_full(e: BaseException, where=None) -> bool:
    """`e` (or an exception it was raised from) says the file system or the user's quota is
    full. torch.save to a path reports a failed write as a RuntimeError without the OSError:
    then, when `where` is given, a file system with (almost) no space left there decides."""
    import errno
    import shutil

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if where is not None and isinstance(e, RuntimeError) and "unexpected pos" in str(e):
            try:
                return shutil.disk_usage(where).free < (1 << 20)
            except OSError:
                return False
        e = e.__cause__ or e.__context__
    return False


def is_short_write(e: BaseException) -> bool:
    """`e` (or its cause) is torch.save's report of a write the file system did not take in
    full ("unexpected pos"): a full disk or quota, more rarely an I/O error. Whether space is
    short *now* cannot tell: another rank may already have freed its part."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, RuntimeError) and "unexpected pos" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False
