"""Against a real single-node SLURM cluster (slurm/cluster/start.sh, started here if needed): the tiny recipe through
submitit and through the sbatch template, 2 tasks forming a 2-rank DDP job, cancel, preemption and time-limit
signals → checkpoint → requeue → exact resume, and a request the scheduler refuses at submit time."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, recipe_dict, write_recipe

pytestmark = pytest.mark.slow
STATE = Path(os.environ.get("MULTITUNE_SLURM_DIR", "/tmp/multitune-slurm"))
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")
STEPS = 16


def _alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="module")
def cluster():
    """The test cluster, started (installed if missing) by the repo's script. Skips only where it cannot be
    started; with MULTITUNE_REQUIRE_SLURM=1 (CI) that is a failure instead."""
    def unavailable(reason: str):
        if os.environ.get("MULTITUNE_REQUIRE_SLURM") == "1":
            pytest.fail(f"{reason} (MULTITUNE_REQUIRE_SLURM=1)")
        pytest.skip(reason)

    if os.geteuid() != 0:
        unavailable("the SLURM tests start a real cluster (slurm/cluster/start.sh), which needs root")
    was_running = _alive(STATE / "run" / "slurmctld.pid")
    started = subprocess.run(["bash", str(REPO / "slurm" / "cluster" / "start.sh")], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        unavailable(f"could not start the test SLURM cluster: {(started.stderr.strip() or '?').splitlines()[-1]}")
    conf = started.stdout.strip().splitlines()[-1].split("=", 1)[1]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", conf)  # for sbatch/sacct here and, exported, inside the jobs
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("PYTHON", sys.executable)  # the template's interpreter
        yield
    if not was_running:
        subprocess.run(["bash", str(REPO / "slurm" / "cluster" / "stop.sh")], stdin=subprocess.DEVNULL, timeout=120)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prep-cache")  # one tokenization for every job of this file


def job_recipe(tmp_path: Path, model_dir: Path, cache: Path, name: str = "job", **sections) -> Path:
    sections = {"data": {"cache_dir": str(cache)}, "train": {"max_steps": STEPS},
                "checkpoint": {"every_steps": 4, "keep_last": 2}, **sections}
    return write_recipe(tmp_path / f"{name}.yaml", recipe_dict(tmp_path / name, model_dir, **sections))


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`multitune ARGS` in this process (a job's own processes are what costs start-up time here)."""
    from launch.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "UNKNOWN"


def wait_for_state(job_id: str, timeout: float = 180) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = sacct_state(job_id)
        if state.startswith(TERMINAL):
            return state
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} still {sacct_state(job_id)} after {timeout}s")


def steps(run: Path) -> dict[int, float]:
    path = run / "log.jsonl"
    if not path.exists():
        return {}
    return {e["step"]: e["loss"] for e in map(json.loads, path.read_text().splitlines()) if "eval" not in e}


def wait_for_step(run: Path, step: int, job_id: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    checked = 0.0
    while time.time() < deadline:
        if len(steps(run)) >= step:
            return
        if time.time() - checked > 1:
            assert not sacct_state(job_id).startswith(TERMINAL), f"job {job_id} ended before step {step}"
            checked = time.time()
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach step {step} in {timeout}s")


def at_step(run: Path, step: int, job_id: str, command) -> list:
    """Run `command` (a signal, a requeue, a cancel; a list, or a function returning one) once the job has logged
    `step`, from a thread, so jobs submitted together run side by side on the cluster's 2 CPUs. Returns the list any
    error of the thread lands in."""
    errors: list = []

    def watch():
        try:
            wait_for_step(run, step, job_id)
            subprocess.run(command() if callable(command) else command, check=True, capture_output=True)
        except Exception as exc:  # reported by the test that owns the job
            errors.append(exc)

    threading.Thread(target=watch, daemon=True).start()
    return errors


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory, tiny_model_dir, shared_cache):
    """Every job of this file, submitted up front (each test then checks its own), so that two run at a time."""
    from launch.slurm import SlurmOptions, submit
    from recipes.loader import load_recipe

    def submitted(name: str, options: SlurmOptions, **sections):
        tmp = tmp_path_factory.mktemp(name)
        path = job_recipe(tmp, tiny_model_dir, shared_cache, **sections)
        recipe = load_recipe(path)
        return recipe.output_path, submit(recipe, str(path), [], options)

    one_cpu = SlurmOptions(cpus_per_task=1, time="10")
    found = {}
    run, job = submitted("cancel", one_cpu, train={"max_steps": 10_000})
    found["cancel"] = (run, job, at_step(run, 1, job.job_id, ["scancel", job.job_id]))
    run, job = submitted("requeue", one_cpu)
    found["requeue"] = (run, job, at_step(run, 2, job.job_id, ["scontrol", "requeue", job.job_id]))
    tmp = tmp_path_factory.mktemp("template")
    path = job_recipe(tmp, tiny_model_dir, shared_cache)
    job_id = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", f"--output={tmp}/slurm-%j.out",
                             str(REPO / "slurm" / "train.sbatch"), str(path)],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    run = tmp / "job" / "run"
    found["template"] = (run, job_id, at_step(run, 2, job_id, ["scancel", "--signal=USR2", job_id]))
    run, job = submitted("ddp", SlurmOptions(tasks_per_node=2, cpus_per_task=1, time="10"),
                         train={"max_steps": 6}, distributed={"strategy": "ddp"})

    def signal_rank_1_only():
        log = (run / "slurm" / f"{job.job_id}_1_log.out").read_text()
        return ["kill", "-USR1", re.search(r"rank 1/2 .* pid (\d+),", log).group(1)]

    found["ddp"] = (run, job, at_step(run, 1, job.job_id, signal_rank_1_only))
    yield found
    # A failed or interrupted test must not leave jobs behind (no-op for jobs that ended).
    ids = [entry[1] if isinstance(entry[1], str) else entry[1].job_id for entry in found.values()]
    subprocess.run(["scancel", *ids], capture_output=True)


@pytest.fixture(scope="module")
def reference(jobs, tmp_path_factory, tiny_model_dir, shared_cache) -> dict:
    """The tiny recipe submitted with `multitune slurm ... --wait`, uninterrupted: the losses others must match."""
    from launch.cli import main

    tmp = tmp_path_factory.mktemp("reference")
    recipe = job_recipe(tmp, tiny_model_dir, shared_cache)
    log = tmp / "stdout.txt"
    with open(log, "w") as out, contextlib.redirect_stdout(out):
        code = main(["slurm", str(recipe), "--cpus-per-task", "1", "--time", "10", "--wait"])
    assert code == 0, log.read_text()
    return {"recipe": recipe, "run": tmp / "job" / "run", "stdout": log.read_text()}


def test_submitit_job_trains_and_its_script_is_the_dry_run(reference, capsys):
    run = reference["run"]
    job_id = re.search(r"submitted job (\d+)", reference["stdout"]).group(1)
    assert f"tail -f {run.resolve()}/slurm/{job_id}_0_log.out" in reference["stdout"]
    assert f"job {job_id} completed" in reference["stdout"]
    assert sorted(steps(run)) == list(range(1, STEPS + 1))
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((run / "metrics.json").read_text())["steps"] == STEPS
    # --dry-run renders exactly the script submitit handed to sbatch.
    code, out, err = cli(capsys, "slurm", str(reference["recipe"]), "--cpus-per-task", "1", "--time", "10",
                         "--dry-run")
    assert code == 0, err
    assert out == (run / "slurm" / f"{job_id}_submission.sh").read_text()


def test_two_tasks_form_a_ddp_job_whose_ranks_stop_together(jobs):
    """2 tasks on one node = a 2-rank DDP job. Only rank 1 gets SIGUSR1: both ranks still stop after the same step
    (the flag is all-reduced), rank 0 requeues the job, and the next allocation finishes the run."""
    run, job, errors = jobs["ddp"]
    job.results()
    assert not errors, errors
    info = json.loads((run / "metrics.json").read_text())["distributed"]
    assert info["world_size"] == 2 and info["wrapper"] == "DistributedDataParallel", info
    logs = [(run / "slurm" / f"{job.job_id}_{rank}_log.out").read_text() for rank in (0, 1)]
    addresses = {m for log in logs for m in re.findall(r"rendezvous (\S+),", log)}
    assert len(addresses) == 2, addresses  # each allocation: one address, both ranks (a new port after requeue)
    assert "rank 0/2" in logs[0] and "rank 1/2" in logs[1]
    stops = {re.search(r"stopped by SIGUSR1 after step (\d+)", log).group(1) for log in logs}
    assert len(stops) == 1, stops
    assert f"requeueing job {job.job_id}" in logs[0] and "restart 1" in logs[1]
    assert sorted(steps(run)) == list(range(1, 7))


def test_cancelled_job_is_reported_cancelled(jobs):
    _, job, errors = jobs["cancel"]
    assert wait_for_state(job.job_id, timeout=600).startswith("CANCELLED")
    assert not errors, errors
    job.wait()
    assert job.state.startswith("CANCELLED")
    with pytest.raises(Exception, match="CANCELLED"):
        job.result()


def test_requeue_mid_run_resumes_to_the_same_losses(jobs, reference):
    """`scontrol requeue` (what preemption with requeue does): SIGTERM → checkpoint at a step boundary → the job
    runs again and resumes; every step's loss equals the uninterrupted run's."""
    run, job, errors = jobs["requeue"]
    job.result()  # waits through the requeue
    assert not errors, errors
    log = (run / "slurm" / f"{job.job_id}_0_log.out").read_text()
    stopped = int(re.search(r"stopped by SIGTERM after step (\d+)", log).group(1))
    assert stopped < STEPS and "restart 1" in log and "resume" in log
    assert steps(run) == pytest.approx(steps(reference["run"]), rel=1e-5)


def test_sbatch_template_chains_through_time_limit_signals(jobs, reference):
    """The plain sbatch template, sent SIGUSR2 as SLURM does before the time limit: the job checkpoints, requeues
    itself, resumes, and ends like the uninterrupted run."""
    run, job_id, errors = jobs["template"]
    assert wait_for_state(job_id, timeout=600) == "COMPLETED"
    assert not errors, errors
    log = (run.parents[1] / f"slurm-{job_id}.out").read_text()
    assert "stopped by SIGUSR2" in log and f"requeueing job {job_id}" in log and "restart 1" in log, log[-3000:]
    assert steps(run) == pytest.approx(steps(reference["run"]), rel=1e-5)
    assert json.loads((run / "metrics.json").read_text())["steps"] == STEPS


def test_impossible_request_is_refused_at_submit_in_one_line(cluster, tmp_path, tiny_model_dir, shared_cache,
                                                            capsys):
    path = job_recipe(tmp_path, tiny_model_dir, shared_cache)
    code, out, err = cli(capsys, "slurm", str(path), "--mem", "100000G")
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sbatch refused the job:"), err
    assert "Memory specification can not be satisfied" in lines[0] or "node configuration" in lines[0]
    assert not (tmp_path / "job" / "run").exists()


def test_sbatch_template_asks_for_what_submitit_asks_for():
    """slurm/train.sbatch and `multitune slurm --dry-run` with the template's resources: the same directives
    (apart from where logs go and submitit's bookkeeping), and both run launch.slurm_task.run_task per task."""
    from launch.slurm import SlurmOptions, render_sbatch

    def directives(script: str) -> dict[str, str]:
        found = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", script, flags=re.MULTILINE))
        return {k: v for k, v in found.items() if k not in ("output", "error", "wckey")}

    template = (REPO / "slurm" / "train.sbatch").read_text()
    rendered = render_sbatch(Path("/runs/x/slurm"), SlurmOptions())
    assert directives(template) == directives(rendered)
    assert re.search(r"^srun --unbuffered .* -m launch\.slurm_task ", template, flags=re.MULTILINE)
    assert re.search(r"^srun --unbuffered .* -m submitit\.core\._submit ", rendered, flags=re.MULTILINE)


def test_time_formats_and_impossible_layouts_are_checked_before_submitting(tmp_path, tiny_model_dir):
    from launch.slurm import SlurmOptions, check_options, minutes
    from recipes.errors import InputError
    from recipes.loader import validate_recipe

    assert [minutes(t) for t in ("90", "1:30", "01:30:00", "1-0", "1-2:30", "0-0:0:30")] == [90, 2, 90, 1440, 1590, 1]
    with pytest.raises(InputError, match="--time '1:2:3:4'"):
        minutes("1:2:3:4")
    single = validate_recipe(recipe_dict(tmp_path, tiny_model_dir))
    with pytest.raises(InputError, match="distributed.strategy=single"):
        check_options(SlurmOptions(nodes=2), single)
    with pytest.raises(InputError, match="--nodes 0"):
        check_options(SlurmOptions(nodes=0), single)
    check_options(SlurmOptions(gpus_per_node=1), single)
