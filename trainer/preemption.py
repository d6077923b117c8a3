"""Stop a run cleanly on SIGTERM/SIGUSR1/SIGUSR2 (preemption, `scontrol requeue`, SLURM's time-limit warning):
remember the signal, and let every rank agree at a step boundary, so all of them checkpoint the same step."""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(Exception):
    """The run stopped early on a signal after writing a complete checkpoint; `--resume` continues it exactly."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint}")


class StopSignals:
    """While entered, the stop signals set a flag instead of ending the process; `agreed` shares it across ranks.

    Handlers can only be installed from the main thread; elsewhere (a trainer called from a worker thread) the
    signals keep their previous behaviour and `agreed` stays 0.
    """

    def __init__(self):
        self.received = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum  # the first signal names the reason

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (0: none). Collective when distributed: every rank calls it every step,
        one tiny all-reduce, so all ranks stop after the same step even if only one was signalled."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())
