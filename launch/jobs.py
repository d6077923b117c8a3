"""Run command lines as a submitit job array (SLURM on a cluster; `local`/`debug` executors for tests)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ArrayOptions:
    """What a job array asks the scheduler for; `cluster=None` lets submitit pick SLURM when `sbatch` exists."""

    folder: Path
    cluster: str | None = None  # None (auto: slurm) | "slurm" | "local" | "debug"
    partition: str | None = None
    gpus_per_node: int = 0
    cpus_per_task: int = 4
    timeout_min: int = 60
    parallelism: int = 8  # array tasks running at once


def run_command(command: list[str]) -> int:
    """The job body: one command line (a trial's `multitune train ...` or an agent); its exit code."""
    return subprocess.run(command, check=False).returncode


def submit_array(commands: list[list[str]], options: ArrayOptions) -> list:
    """Submit one array task per command; returns submitit jobs (`job.result()` is the exit code)."""
    import submitit

    executor = submitit.AutoExecutor(folder=options.folder, cluster=options.cluster)
    params = dict(timeout_min=options.timeout_min, cpus_per_task=options.cpus_per_task,
                  slurm_array_parallelism=options.parallelism)
    if options.gpus_per_node:
        params["gpus_per_node"] = options.gpus_per_node
    if options.partition:
        params["slurm_partition"] = options.partition
    executor.update_parameters(**params)
    return executor.map_array(run_command, commands)
