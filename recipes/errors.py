"""The exception types users see as one line: bad input (exit code 2) and a run stopped by its environment (exit 1)."""

import errno


class InputError(Exception):
    """A problem with what the user gave us; the message names the field, file or row and fits on one line."""


class RunStopped(Exception):
    """A run stopped for a reason outside the code (disk full, non-finite loss, a rank died); the message says
    why and what was kept (the last complete checkpoint), on one line."""


def is_disk_full(error: BaseException) -> bool:
    """An OS, Arrow or safetensors error that means the device is out of space (or quota, or file-size limit)."""
    message = str(error)
    return (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)) \
        or "No space left" in message or "os error 28" in message or "File too large" in message
