"""The one way a process trains and ends: `run_training` owns what a stop signal, a lost peer and teardown become,
and `exit_code` turns an error into one line and the process's exit code. Used by `multitune train` (the single
process, and each rank `accelerate launch -m multitune train` starts), the SLURM task, and so by sweep trials
(each trial is a `multitune train` process)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from multitune.recipes.errors import InputError, RunStopped, is_disk_full

EXIT_OK, EXIT_STOPPED, EXIT_BAD_INPUT, EXIT_PREEMPTED = 0, 1, 2, 3


def run_training(recipe, *, resume: bool, overwrite: bool, force_resume: bool = False,
                 after_preemption: Callable | None = None) -> int:
    """Train `recipe` in this process; returns the exit code.

    0: finished. A stop signal (SIGTERM, SIGUSR1/2) ends the run after a complete checkpoint; then
    `after_preemption(stop)` decides the code (the SLURM task requeues the job there), by default 3 with a line
    saying how to continue. Raises RunStopped (one line) when a collective with the other ranks fails (a rank died
    or hung past `distributed.timeout_s`), InputError for bad input. The process always leaves its process group,
    while the interpreter is fully alive.
    """
    import torch.distributed

    from multitune.trainer.distributed import leave_process_group
    from multitune.trainer.loop import train
    from multitune.trainer.preemption import Preempted

    try:
        train(recipe, resume=resume, overwrite=overwrite, force_resume=force_resume)
        return EXIT_OK
    except Preempted as stop:
        if after_preemption is not None:
            return after_preemption(stop)
        print(f"[multitune] {stop}; continue with --resume", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except RuntimeError as exc:  # a peer rank died or hung: say so in one line instead of gloo's/NCCL's traceback
        lost_peer = isinstance(exc, torch.distributed.DistError) or any(s in str(exc) for s in ("gloo", "NCCL"))
        if not (torch.distributed.is_initialized() and lost_peer):
            raise
        raise RunStopped(f"rank {torch.distributed.get_rank()}: a collective with the other ranks failed "
                         f"({' '.join(str(exc).split())[:160]}): a rank died, or hung longer than "
                         f"distributed.timeout_s={recipe.distributed.timeout_s}") from None
    finally:
        leave_process_group()


def exit_code(exc: BaseException, command: str, user_input: bool) -> int | None:
    """Print `exc` as one `error:` line on stderr and return the exit code, or None for a fault of ours (the caller
    re-raises it, traceback and all). 2: bad input (InputError; with `user_input`, also a ValueError/OSError from
    reading what the user named); 1: the run stopped for an outside reason (RunStopped, a full disk)."""
    from jinja2 import TemplateError

    if isinstance(exc, InputError):
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if isinstance(exc, RunStopped):
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    if isinstance(exc, OSError) and is_disk_full(exc):
        # Checkpoints and the prep cache are written to temporary names and renamed when complete, so what is there
        # is whole; a checkpoint that did not fit is reported by the checkpoint code itself, with what was kept.
        where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"error: no space left on the device{where} ({exc}); free some space and run the command again",
              file=sys.stderr)
        return EXIT_STOPPED
    if user_input and isinstance(exc, (OSError, ValueError, TemplateError)):
        print(f"error: multitune {command}: {type(exc).__name__}: {' '.join(str(exc).split())[:400]}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    return None
