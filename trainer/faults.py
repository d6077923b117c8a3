"""Crash-test seam: `MULTITUNE_KILL_AT=<point>[@<step>]` SIGKILLs this process when it reaches that point.

Tests use it to prove that a process killed at any stage of writing a checkpoint loses nothing; without the
variable every call is a dictionary lookup and returns.
"""

from __future__ import annotations

import os
import signal


def kill_point(point: str, step: int) -> None:
    spec = os.environ.get("MULTITUNE_KILL_AT")
    if not spec:
        return
    name, _, at = spec.partition("@")
    if name == point and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)
