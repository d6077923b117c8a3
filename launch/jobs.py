"""Run command lines as a submitit job array (SLURM on a cluster; `local`/`debug` executors for tests)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from multitune.launch.scheduler import scheduler_reason
from multitune.recipes.errors import InputError


@dataclass(frozen=True)
class ArrayOptions:
    """What a job array asks the scheduler for; `cluster=None` lets submitit pick SLURM when `sbatch` exists. None
    leaves a setting to the cluster's default (SLURM: one CPU per task, the default partition)."""

    folder: Path
    cluster: str | None = None  # None (auto: slurm) | "slurm" | "local" | "debug"
    partition: str | None = None
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    timeout_min: int = 60
    parallelism: int = 8  # array tasks running at once

    def describe(self) -> str:
        """What each task asks for, in words (printed before waiting on the scheduler)."""
        cpus = f"{self.cpus_per_task} CPUs" if self.cpus_per_task else "the cluster's default CPUs (SLURM: 1)"
        gpus = f"{self.gpus_per_node} GPU(s)" if self.gpus_per_node else "no GPU"
        return (f"each {cpus}, {gpus}, {self.timeout_min} min, on partition {self.partition or '(default)'}, "
                f"at most {self.parallelism} at once")


def check_array_options(options: ArrayOptions) -> None:
    for flag, value, least in (("--cpus-per-task", options.cpus_per_task, 1), ("--gpus-per-node",
                               options.gpus_per_node, 0), ("--timeout-min", options.timeout_min, 1),
                               ("--parallelism", options.parallelism, 1)):
        if value is not None and value < least:
            raise InputError(f"{flag} {value} is out of range (at least {least})")


def run_command(command: list[str]) -> int:
    """The job body: one command line (a trial's `multitune train ...` or an agent); its exit code."""
    return subprocess.run(command, check=False).returncode


def submit_array(commands: list[list[str]], options: ArrayOptions) -> list:
    """Submit one array task per command; returns submitit jobs (`job.result()` is the exit code). The scheduler's
    refusal (unknown partition, a request no node can meet) becomes an InputError, one line."""
    import contextlib
    import io

    import submitit

    check_array_options(options)
    executor = submitit.AutoExecutor(folder=options.folder, cluster=options.cluster)
    params = dict(timeout_min=options.timeout_min, slurm_array_parallelism=options.parallelism)
    if options.cpus_per_task:
        params["cpus_per_task"] = options.cpus_per_task
    if options.gpus_per_node:
        params["gpus_per_node"] = options.gpus_per_node
    if options.partition:
        params["slurm_partition"] = options.partition
    executor.update_parameters(**params)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr over several lines
            return executor.map_array(run_command, commands)
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as exc:
        raise InputError(f"sbatch refused the job array: {scheduler_reason(str(exc))}") from None
