"""The exception types users see as one line: bad input (exit code 2) and a run stopped by its environment (exit 1)."""


class InputError(Exception):
    """A problem with what the user gave us; the message names the field, file or row and fits on one line."""


class RunStopped(Exception):
    """A run stopped for a reason outside the code (disk full, non-finite loss, a rank died); the message says
    why and what was kept (the last complete checkpoint), on one line."""
