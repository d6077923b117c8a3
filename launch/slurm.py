"""`multitune slurm`: submit a recipe as one SLURM job through submitit (one task per GPU, or per process on a
CPU cluster), render the exact sbatch script it uses (`--dry-run`), and turn scheduler refusals into one line."""

from __future__ import annotations

import contextlib
import io
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from multitune.compat import submitit_sbatch_script
from multitune.launch.scheduler import scheduler_reason
from multitune.recipes.errors import InputError

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "slurm" / "train.sbatch"
TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")  # sbatch --time formats


@dataclass(frozen=True)
class SlurmOptions:
    """What the job asks the scheduler for; None leaves a setting to the cluster's defaults."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one per GPU, or 1 without GPUs
    cpus_per_task: int | None = None
    time: str = "04:00:00"  # D-HH:MM:SS, HH:MM:SS or minutes
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    mem: str | None = None  # per node, as sbatch takes it: 64G, 500M
    constraint: str | None = None
    max_requeues: int = 10  # time-limit requeues before the job gives up
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: checkpoint, then requeue
    job_name: str = "multitune"

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


def minutes(time: str) -> int:
    """sbatch's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, rounded up (submitit's unit)."""
    match = TIME.match(time.strip())
    if not match:
        raise InputError(f"--time {time!r}: expected minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
    days, *fields = match.groups()
    values = [int(f) for f in fields if f is not None]
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = int(days) * 86400 + sum(v * unit for v, unit in zip(values, (3600, 60, 1)))
    else:  # M, M:S, H:M:S
        seconds = sum(v * unit for v, unit in zip(values, {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(values)]))
    if seconds <= 0:
        raise InputError(f"--time {time!r} must be positive")
    return math.ceil(seconds / 60)


def check_options(options: SlurmOptions, recipe) -> None:
    minutes(options.time)
    for name in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "max_requeues", "signal_delay_s"):
        value = getattr(options, name)
        if value is not None and value < (1 if name in ("nodes", "tasks_per_node", "cpus_per_task") else 0):
            raise InputError(f"--{name.replace('_', '-')} {value} is out of range")
    if options.world_size > 1 and recipe.distributed.strategy == "single":
        raise InputError(f"--nodes {options.nodes} x {options.ntasks_per_node} tasks per node start "
                         f"{options.world_size} ranks, but distributed.strategy=single: set ddp, fsdp, zero2 or zero3")


def signal_warning(options: SlurmOptions) -> str | None:
    """A warning when the time-limit signal would come at or before the job's start (the job would checkpoint and
    requeue at once, allocation after allocation, until --max-requeues runs out)."""
    limit_s = minutes(options.time) * 60
    if options.signal_delay_s < limit_s:
        return None
    return (f"warning: --signal-delay {options.signal_delay_s} s is not shorter than --time {options.time} "
            f"({limit_s} s): the time-limit signal comes as the job starts; lower --signal-delay or raise --time")


def log_paths(folder: Path, job_id: str, options: SlurmOptions) -> str:
    """Every rank's stdout and stderr log (submitit's `<job>_<rank>_log.out|err`), as a shell word list."""
    if options.world_size == 1:
        return f"{folder}/{job_id}_0_log.out {folder}/{job_id}_0_log.err"
    return f"{folder}/{job_id}_{{0..{options.world_size - 1}}}_log.{{out,err}}"  # bash brace expansion


def executor_parameters(options: SlurmOptions) -> dict:
    """submitit SlurmExecutor parameters (they are sbatch's, in submitit's spelling)."""
    params = dict(job_name=options.job_name, nodes=options.nodes, ntasks_per_node=options.ntasks_per_node,
                  time=minutes(options.time), signal_delay_s=options.signal_delay_s,
                  additional_parameters={"requeue": True})
    optional = dict(gpus_per_node=options.gpus_per_node or None, cpus_per_task=options.cpus_per_task,
                    partition=options.partition, account=options.account, qos=options.qos, mem=options.mem,
                    constraint=options.constraint)
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def job_folder(recipe) -> Path:
    """submitit's folder (pickles, sbatch script, one log per task) inside the run's output_dir."""
    return (recipe.output_path / "slurm").resolve()


def render_sbatch(folder: Path, options: SlurmOptions) -> str:
    """The sbatch script submitit writes for this job, from submitit's own renderer (no SLURM needed)."""
    return submitit_sbatch_script(folder, sys.executable, executor_parameters(options))


def submit(recipe, recipe_path: str, overrides: list[str], options: SlurmOptions, overwrite: bool = False,
           resume: bool = False):
    """Submit the job; returns the submitit Job. The scheduler's refusal becomes an InputError (one line)."""
    import submitit

    from multitune.launch.slurm_task import SlurmTraining

    check_options(options, recipe)
    folder = job_folder(recipe)
    # A refused job leaves nothing behind: remove the folders this submission created.
    created = next((p for p in (recipe.output_path, folder) if not p.exists()), None)
    try:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=options.max_requeues)
    except RuntimeError as exc:  # no srun on this machine
        raise InputError(f"cannot submit: {exc}") from None
    executor.update_parameters(**executor_parameters(options))
    task = SlurmTraining(str(Path(recipe_path).resolve()), list(overrides), overwrite, options.max_requeues,
                         str(Path.cwd()), resume)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr over several lines
            return executor.submit(task)
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as exc:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise InputError(f"sbatch refused the job: {scheduler_reason(str(exc))}") from None


def add_parser(sub) -> None:
    p = sub.add_parser("slurm", help="submit a recipe as a SLURM job (submitit): one process per GPU, requeue on "
                                     "preemption and time limits")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one process each (0: CPU only)")
    p.add_argument("--tasks-per-node", type=int, help="processes per node (default: one per GPU, or 1)")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--time", default="04:00:00", help="time limit per allocation, D-HH:MM:SS or minutes "
                                                      "(longer runs requeue and chain)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--mem", help="memory per node, e.g. 64G")
    p.add_argument("--constraint")
    p.add_argument("--max-requeues", type=int, default=10, help="time-limit requeues before giving up (default 10)")
    p.add_argument("--signal-delay", type=int, default=120, metavar="S",
                   help="seconds before the time limit at which the job checkpoints and requeues (default 120)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its newest checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit 1 if it did not complete")


def options_from_args(args) -> SlurmOptions:
    return SlurmOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                        cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition,
                        account=args.account, qos=args.qos, mem=args.mem, constraint=args.constraint,
                        max_requeues=args.max_requeues, signal_delay_s=args.signal_delay)
