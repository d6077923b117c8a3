"""One rank of a SLURM training job (submitit's or the sbatch template's): rendezvous from the SLURM environment,
train (resuming after a requeue), and on a preemption/time-limit signal checkpoint and requeue the job.

`srun python -m multitune.launch.slurm_task [--max-requeues N] [--overwrite] RECIPE [key=value ...]` in
slurm/train.sbatch; `multitune slurm` pickles a `SlurmTraining` that calls the same `run_task`.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field

from multitune.compat import quiet_library_noise
from multitune.launch.run import exit_code, run_training
from multitune.recipes.errors import InputError

# The lowest port of the range a job's rendezvous port is taken from (job id and restart pick one in 20000).
PORT_BASE = 20000


def hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list (`gpu[01-03],cpu7`) the way SLURM does."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def rendezvous_env(env: dict[str, str]) -> dict[str, str]:
    """torch.distributed's variables for this task: main address = first node of the allocation, a port derived
    from the job id (the same on every node, different after a requeue), global/local rank and sizes."""
    nodes = hostnames(env["SLURM_JOB_NODELIST"])
    world = int(env["SLURM_NTASKS"])
    restarts = int(env.get("SLURM_RESTART_COUNT", "0"))
    port = env.get("MASTER_PORT") or str(PORT_BASE + (int(env["SLURM_JOB_ID"]) * 7 + restarts) % 20000)
    return {"MASTER_ADDR": env.get("MASTER_ADDR") or nodes[0], "MASTER_PORT": port,
            "RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(world), "LOCAL_RANK": env["SLURM_LOCALID"],
            "LOCAL_WORLD_SIZE": str(world // len(nodes)), "NODE_RANK": env["SLURM_NODEID"]}


def run_task(recipe_path: str, overrides: list[str], overwrite: bool, max_requeues: int, resume: bool = False) -> int:
    """Train as this task's rank; with `resume`, or after a requeue (SLURM_RESTART_COUNT > 0), continue from the
    newest checkpoint."""
    os.environ.update(rendezvous_env(os.environ))
    from multitune.recipes.loader import load_recipe
    from multitune.trainer.checkpoint import list_checkpoints

    quiet_library_noise()

    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    recipe = load_recipe(recipe_path, overrides)
    if int(os.environ["WORLD_SIZE"]) > 1 and recipe.distributed.strategy == "single":
        raise InputError(f"distributed.strategy=single cannot run on {os.environ['WORLD_SIZE']} tasks: set ddp, "
                         "fsdp, zero2 or zero3")
    resume = (resume or restarts > 0) and bool(list_checkpoints(recipe.output_path / "checkpoints"))
    # A restart before the first checkpoint starts over: what is in output_dir is this job's own partial run.
    overwrite = not resume and (overwrite or restarts > 0)
    print(f"[multitune] rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']} on {os.uname().nodename} "
          f"pid {os.getpid()}, job {os.environ.get('SLURM_JOB_ID')} restart {restarts}, rendezvous "
          f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}, {'resume' if resume else 'start'}", flush=True)
    return run_training(recipe, resume=resume, overwrite=overwrite,
                        after_preemption=lambda stop: _after_preemption(stop, restarts, max_requeues))


def _after_preemption(stop, restarts: int, max_requeues: int) -> int:
    """SIGTERM comes from whoever ends the job (preemption, `scontrol requeue`, scancel), who also decides whether
    it runs again. SIGUSR1/SIGUSR2 is the warning before the time limit (or a user's request): rank 0 requeues the
    job itself, up to `max_requeues` times, so a run longer than the limit chains until done.

    Raises SystemExit, never returns: under submitit a return would record the job as finished."""
    print(f"[multitune] {stop}", flush=True)
    raise SystemExit(_requeue(stop.signum, restarts, max_requeues))


def _requeue(signum: int, restarts: int, max_requeues: int) -> int:
    if signum == signal.SIGTERM or os.environ["RANK"] != "0":
        return 0
    job = os.environ["SLURM_JOB_ID"]
    if restarts >= max_requeues:
        print(f"error: job {job} reached its limit of {max_requeues} requeues; continue with `multitune slurm ... "
              "--resume` or raise --max-requeues", file=sys.stderr, flush=True)
        return 1
    # Printed first: the requeue ends this allocation, and SLURM's SIGTERM may end us before anything after it.
    print(f"[multitune] requeueing job {job} ({restarts + 1} of at most {max_requeues} requeues)", flush=True)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    return 0


@dataclass(frozen=True)
class SlurmTraining:
    """What submitit pickles and every task of the job runs: `run_task` from the directory the job was submitted
    from (relative paths in the recipe mean what they meant there)."""

    recipe_path: str
    overrides: list[str] = field(default_factory=list)
    overwrite: bool = False
    max_requeues: int = 10
    workdir: str = "."
    resume: bool = False

    def __call__(self) -> int:
        os.chdir(self.workdir)
        return run_task(self.recipe_path, self.overrides, self.overwrite, self.max_requeues, self.resume)

    def checkpoint(self):
        """submitit calls this on USR2 that arrives before the training loop handles signals (still starting up):
        run the same task again, which resumes from the newest checkpoint if there is one."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multitune.launch.slurm_task", description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir")
    parser.add_argument("--max-requeues", type=int, default=10, help="time-limit requeues before giving up")
    parser.add_argument("--print-log-dir", action="store_true",
                        help="print the folder the job's logs go to (<output_dir>/slurm) and exit")
    args = parser.parse_args(argv)
    if args.print_log_dir:
        from multitune.launch.slurm import job_folder
        from multitune.recipes.loader import load_recipe

        print(job_folder(load_recipe(args.recipe, args.overrides)))
        return 0
    try:
        return run_task(args.recipe, args.overrides, args.overwrite, args.max_requeues, args.resume)
    except Exception as exc:  # noqa: BLE001 - ours re-raised with their traceback
        code = exit_code(exc, "slurm task", user_input=False)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())
