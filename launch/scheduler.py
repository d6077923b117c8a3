"""What SLURM says about jobs we submitted: its refusals on one line, and waiting that stops (and cancels the job)
when a pending reason can never clear, instead of waiting forever."""

from __future__ import annotations

import subprocess
import time

from multitune.recipes.errors import InputError

# Pending reasons (Slurm 22.05, `squeue -o %r`) that no amount of waiting clears: the job asks for more than its
# partition, QOS or association allows per job, names what does not exist, or depends on a job that failed. Only
# an administrator changing the cluster could let it start. Left out on purpose, because they clear by themselves:
# Resources, Priority, the Group/MaxJobs/MaxSubmit limits (other jobs finish), ReqNodeNotAvail and PartitionDown
# (nodes and partitions come back after maintenance), BeginTime, Dependency, JobHeld*.
NEVER_CLEARS = {
    "PartitionConfig": "the job asks for more CPUs, GPUs, memory or nodes than its partition has",
    "PartitionNodeLimit": "the job asks for more (or fewer) nodes than its partition allows",
    "PartitionTimeLimit": "the job's --time exceeds its partition's MaxTime",
    "BadConstraints": "no node has the requested features (--constraint) together with the resources",
    "InvalidAccount": "the account does not exist or is not yours",
    "InvalidQOS": "the QOS does not exist or is not allowed to this account",
    "DependencyNeverSatisfied": "a job it depends on failed",
}
# A per-job limit of a QOS or association (QOSMaxCpuPerJobLimit, AssocMaxWallDurationPerJobLimit, ...).
PER_JOB_LIMIT = ("QOSMax", "AssocMax")


def never_clears(reason: str) -> str | None:
    """Why a job pending for `reason` can never start, or None when the reason may still clear."""
    if reason in NEVER_CLEARS:
        return NEVER_CLEARS[reason]
    if reason.startswith(PER_JOB_LIMIT) and "PerJob" in reason:
        return "the job exceeds a per-job limit of its QOS or association"
    return None


def scheduler_reason(message: str) -> str:
    """The scheduler's own words from a failed sbatch call (submitit's exception text), on one line."""
    errors = [line.split("error:", 1)[1].strip() for line in message.splitlines() if "error:" in line]
    return "; ".join(errors) if errors else " ".join(message.split())[:300]


def pending_reasons(job_id: str) -> dict[str, str]:
    """{task id: reason} for the tasks of `job_id` (an array: every task) that are still pending; {} when none are,
    or when squeue cannot answer right now (the next poll asks again)."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-t", "PENDING", "-o", "%i|%r"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if out.returncode != 0:
        return {}
    return dict(line.split("|", 1) for line in out.stdout.splitlines() if "|" in line)


def cancel(job_id: str) -> None:
    """scancel the job (an array id cancels every task); a job that already ended is not an error."""
    subprocess.run(["scancel", job_id], capture_output=True, timeout=60)


class PendingWatch:
    """Polled while waiting on a job: raises (after cancelling the job) once a reason that can never clear has been
    seen on two polls in a row, so a reason set for an instant while the scheduler reconsiders does not count."""

    def __init__(self, job_id: str):
        self.job_id = job_id.split("_", 1)[0]  # an array task's id names the whole array
        self.seen: dict[str, str] = {}

    def check(self) -> None:
        hopeless = {task: reason for task, reason in pending_reasons(self.job_id).items() if never_clears(reason)}
        repeated = {task: reason for task, reason in hopeless.items() if self.seen.get(task) == reason}
        self.seen = hopeless
        if repeated:
            task, reason = next(iter(repeated.items()))
            cancel(self.job_id)
            raise InputError(f"job {task} can never start: pending reason {reason} ({never_clears(reason)}); "
                             f"cancelled job {self.job_id}")


def wait(job, first_poll_s: float = 2.0, max_poll_s: float = 30.0) -> None:
    """Wait until a submitit job has ended (through requeues), watching its pending reason; see `PendingWatch`.
    Polls every 2 s at first (a hopeless request is reported within seconds of the first scheduling pass), then
    less often, up to every 30 s, to spare the controller during a long run."""
    watch = PendingWatch(str(job.job_id))
    delay = first_poll_s
    while not job.done():
        watch.check()
        time.sleep(delay)
        delay = min(delay * 1.2, max_poll_s)
