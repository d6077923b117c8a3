"""Against a real single-node SLURM cluster (slurm/cluster/start.sh, started here if needed): the tiny recipe through
submitit and through the sbatch template, 2 tasks forming a 2-rank DDP job, cancel, preemption and time-limit
signals → checkpoint → requeue → exact resume, and a request the scheduler refuses at submit time."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
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
    from multitune.launch.cli import main

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
    from multitune.launch.slurm import SlurmOptions, submit
    from multitune.recipes.loader import load_recipe

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
    from multitune.launch.cli import main

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
    logs = f"{run.resolve()}/slurm/{job_id}_0_log"
    assert f"tail -F {logs}.out {logs}.err " in reference["stdout"]
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
    itself, resumes, and ends like the uninterrupted run. Its ranks log to <output_dir>/slurm/, as submitit's do."""
    run, job_id, errors = jobs["template"]
    assert wait_for_state(job_id, timeout=600) == "COMPLETED"
    assert not errors, errors
    log = (run / "slurm" / f"{job_id}_0_log.out").read_text()
    assert "stopped by SIGUSR2" in log and f"requeueing job {job_id}" in log and "restart 1" in log, log[-3000:]
    assert steps(run) == pytest.approx(steps(reference["run"]), rel=1e-5)
    assert json.loads((run / "metrics.json").read_text())["steps"] == STEPS
    own_log = run.parents[1] / f"slurm-{job_id}.out"  # the batch script's own: removed when it stayed empty
    assert not own_log.exists() or own_log.read_text().strip(), "an empty batch log was left behind"


def node_cpus() -> int:
    return int(subprocess.run(["sinfo", "-h", "-o",
                               "%c"], capture_output=True, text=True, check=True).stdout.split()[0])


@pytest.mark.parametrize("flags, reason", [
    (["--mem", "100000G"], "Memory specification can not be satisfied|node configuration is not available"),
    (["--cpus-per-task", "{twice}"], "More processors requested than permitted"),
    (["--tasks-per-node", "{twice}", "--cpus-per-task", "1", "distributed.strategy=ddp"],
     "More processors requested than permitted"),
    (["--nodes", "2", "distributed.strategy=ddp"], "Node count specification invalid"),
])
def test_impossible_request_is_refused_at_submit_in_one_line(cluster, tmp_path, tiny_model_dir, shared_cache,
                                                            capsys, flags, reason):
    """More memory, CPUs, tasks or nodes than the cluster has: refused by sbatch (the test cluster enforces
    partition limits at submit, EnforcePartLimits=ALL), one line, exit 2, nothing left in output_dir."""
    path = job_recipe(tmp_path, tiny_model_dir, shared_cache)
    flags = [flag.format(twice=2 * node_cpus()) for flag in flags]
    code, out, err = cli(capsys, "slurm", str(path), *flags)
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sbatch refused the job:"), err
    assert re.search(reason, lines[0]), lines[0]
    assert not (tmp_path / "job" / "run").exists()


@contextlib.contextmanager
def tightened_partition(name: str):
    """A partition of the test node that takes jobs but runs none yet (State=DOWN). Once a job waits in it, its
    MaxTime drops to 1 minute and it opens, as when an administrator tightens a limit: a job asking for more
    time is accepted (it was submitted before) and can never start (pending reason PartitionTimeLimit)."""
    subprocess.run(["scontrol", "create", f"PartitionName={name}", "Nodes=ALL", "State=DOWN", "MaxTime=INFINITE"],
                   check=True, capture_output=True)

    def tighten():
        deadline = time.time() + 300
        while time.time() < deadline:
            if subprocess.run(["squeue", "-h", "-p", name, "-o", "%i"], capture_output=True, text=True).stdout.strip():
                subprocess.run(["scontrol", "update", f"PartitionName={name}", "MaxTime=1", "State=UP"], check=True)
                return
            time.sleep(0.2)

    threading.Thread(target=tighten, daemon=True).start()
    try:
        yield
    finally:
        for _ in range(60):  # a partition cannot be deleted while the controller still lists its jobs
            if subprocess.run(["scontrol", "delete", f"PartitionName={name}"], capture_output=True).returncode == 0:
                break
            time.sleep(2)


def ctrl_c_delivered() -> None:
    """A Ctrl-C test's child takes SIGINT as Python's KeyboardInterrupt even when the suite itself was started in
    the background by a shell, whose children inherit SIGINT ignored (Python then never installs its handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_job_that_can_never_start_is_cancelled_with_its_reason(cluster, tmp_path, tiny_model_dir, shared_cache,
                                                                 capsys):
    """What a cluster accepts but can never run: `--wait` notices the pending reason, cancels the job, and says so
    in one line (exit 2), instead of waiting forever."""
    path = job_recipe(tmp_path, tiny_model_dir, shared_cache)
    partition = f"tight{os.getpid()}"
    with tightened_partition(partition):
        code, out, err = cli(capsys, "slurm", str(path), "--partition", partition, "--cpus-per-task", "1",
                             "--time", "10", "--wait")
        job_id = re.search(r"submitted job (\d+)", out).group(1)
        assert code == 2, out + err
        assert err.strip().splitlines() == [
            f"error: job {job_id} can never start: pending reason PartitionTimeLimit (the job's --time exceeds its "
            f"partition's MaxTime); cancelled job {job_id}"]
        assert wait_for_state(job_id, timeout=60).startswith("CANCELLED")


def test_wait_sits_through_a_reason_that_clears_and_ctrl_c_leaves_the_job_queued(cluster, tmp_path, tiny_model_dir,
                                                                                  shared_cache):
    """PartitionDown (a partition closed for maintenance) clears by itself: `--wait` keeps waiting through it. Ctrl-C
    stops the waiting, not the job, and says how to cancel it."""
    path = job_recipe(tmp_path, tiny_model_dir, shared_cache)
    partition = f"down{os.getpid()}"
    subprocess.run(["scontrol", "create", f"PartitionName={partition}", "Nodes=ALL", "State=DOWN"], check=True)
    proc = subprocess.Popen([sys.executable, "-m", "multitune", "slurm", str(path), "--partition", partition,
                             "--cpus-per-task", "1", "--time", "10", "--wait"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_delivered)
    job_id = None
    try:
        job_id = re.search(r"submitted job (\d+)", proc.stdout.readline()).group(1)
        time.sleep(10)  # several polls see PartitionDown
        assert proc.poll() is None and subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%r"], capture_output=True,
                                                      text=True).stdout.strip() == "PartitionDown"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130
        assert err.strip().splitlines() == [f"stopped waiting; job {job_id} keeps running (scancel {job_id} to stop "
                                            "it)"], err
        assert sacct_state(job_id) == "PENDING"
    finally:
        proc.kill()
        if job_id:
            subprocess.run(["scancel", job_id])
            wait_for_state(job_id, timeout=60)
        for _ in range(60):
            if subprocess.run(["scontrol",
                               "delete", f"PartitionName={partition}"], capture_output=True).returncode == 0:
                break
            time.sleep(2)


def sweep_file(tmp_path: Path, model_dir: Path, cache: Path, parameters: dict) -> Path:
    base = job_recipe(tmp_path, model_dir, cache, name="base", checkpoint={"every_steps": None},
                      eval={"before_training": False, "max_samples": 2, "max_new_tokens": 4})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "cluster", "program": str(base), "method": "grid",
                                    "parameters": parameters}))
    return path


def test_sweep_array_runs_on_the_cluster_with_its_defaults_and_a_timed_out_trial_says_so(
        cluster, tmp_path, tiny_model_dir, shared_cache, capsys):
    """The documented `sweep run --local --slurm` with no resource flags: its tasks fit the cluster (the default
    asks for SLURM's one CPU, said before waiting), a short trial completes, and a trial still running at
    --timeout-min fails with one line saying it timed out. (SLURM sends the warning signal, on which submitit ends a
    task, 90 s before the limit and up to 60 s earlier still: 4 minutes leave the short trial time to finish.)"""
    from multitune.launch.cli import main

    sweep = sweep_file(tmp_path, tiny_model_dir, shared_cache, {"train.max_steps": {"values": [2, 100_000]}})
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["sweep", "run", str(sweep), "--local", "--slurm", "--out", str(out), "--timeout-min", "4"])
    stdout = capsys.readouterr().out
    assert code == 1, stdout
    assert "each the cluster's default CPUs (SLURM: 1), no GPU, 4 min" in stdout
    job_id = re.search(r"submitted 2 array tasks \(job (\d+)", stdout).group(1)
    submission = next((out / "submitit").glob(f"{job_id}_*submission.sh")).read_text()
    assert "--cpus-per-task" not in submission  # nothing asked beyond what every node has
    manifest = json.loads((out / "sweep.json").read_text())
    assert [t["status"] for t in manifest["trials"]] == ["done", "failed"], stdout
    assert (out / "trial-000" / "metrics.json").is_file()
    timed_out = [line for line in stdout.splitlines() if line.startswith("[sweep] trial-001: ")]
    expected = f"timed out: array task {job_id}_1 reached its time limit (--timeout-min 4)"
    assert len(timed_out) == 1 and expected in timed_out[0], stdout


def test_sweep_refusals_and_hopeless_arrays_are_one_line_and_leave_nothing_queued(
        cluster, tmp_path, tiny_model_dir, shared_cache, capsys):
    from multitune.launch.cli import main

    sweep = sweep_file(tmp_path, tiny_model_dir, shared_cache, {"train.lr": {"values": [1e-3, 2e-3]}})
    out = tmp_path / "refused"
    capsys.readouterr()
    assert main(["sweep", "run", str(sweep), "--local", "--slurm", "--out", str(out), "--partition", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: sbatch refused the job array: invalid partition specified: nope; "
                                        "Batch job submission failed: Invalid partition name specified"], err
    assert not out.exists()

    partition = f"tight{os.getpid()}s"
    with tightened_partition(partition):
        code = main(["sweep", "run", str(sweep), "--local", "--slurm", "--out", str(tmp_path / "never"),
                     "--partition", partition, "--timeout-min", "10"])
        captured = capsys.readouterr()
        assert code == 2, captured.out + captured.err
        job_id = re.search(r"submitted 2 array tasks \(job (\d+)", captured.out).group(1)
        line = captured.err.strip().splitlines()
        assert len(line) == 1 and re.fullmatch(
            rf"error: job {job_id}_\d can never start: pending reason PartitionTimeLimit \(.*\); cancelled job "
            rf"{job_id}", line[0]), captured.err
        assert wait_for_state(job_id, timeout=60).startswith("CANCELLED")


def test_ctrl_c_on_a_sweep_cancels_its_array(cluster, tmp_path, tiny_model_dir, shared_cache):
    sweep = sweep_file(tmp_path, tiny_model_dir, shared_cache, {"train.max_steps": {"values": [100_000]}})
    proc = subprocess.Popen([sys.executable, "-m", "multitune", "sweep", "run", str(sweep), "--local", "--slurm",
                             "--out", str(tmp_path / "out")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_delivered)
    try:
        for line in proc.stdout:
            if match := re.search(r"submitted 1 array tasks \(job (\d+)", line):
                break
        else:
            raise AssertionError(f"no array submitted: {proc.stderr.read()}")
        job_id = match.group(1)
        time.sleep(2)  # waiting on the scheduler now
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert err.strip().splitlines() == [f"error: interrupted: cancelled job {job_id} (1 array tasks); finished "
                                        "trials are kept, run the sweep again to continue"], err
    assert wait_for_state(job_id, timeout=60).startswith("CANCELLED")


def test_sbatch_template_asks_for_what_submitit_asks_for():
    """slurm/train.sbatch and `multitune slurm --dry-run` with the template's resources: the same directives
    (apart from where logs go and submitit's bookkeeping), and both run launch.slurm_task.run_task per task."""
    from multitune.launch.slurm import SlurmOptions, render_sbatch

    def directives(script: str) -> dict[str, str]:
        found = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", script, flags=re.MULTILINE))
        return {k: v for k, v in found.items() if k not in ("output", "error", "wckey")}

    template = (REPO / "slurm" / "train.sbatch").read_text()
    rendered = render_sbatch(Path("/runs/x/slurm"), SlurmOptions())
    assert directives(template) == directives(rendered)
    assert re.search(r"^srun --unbuffered .* -m multitune\.launch\.slurm_task ", template, flags=re.MULTILINE)
    assert re.search(r"^srun --unbuffered .* -m submitit\.core\._submit ", rendered, flags=re.MULTILINE)


def test_time_formats_and_impossible_layouts_are_checked_before_submitting(tmp_path, tiny_model_dir):
    from multitune.launch.slurm import SlurmOptions, check_options, minutes
    from multitune.recipes.errors import InputError
    from multitune.recipes.loader import validate_recipe

    assert [minutes(t) for t in ("90", "1:30", "01:30:00", "1-0", "1-2:30", "0-0:0:30")] == [90, 2, 90, 1440, 1590, 1]
    with pytest.raises(InputError, match="--time '1:2:3:4'"):
        minutes("1:2:3:4")
    single = validate_recipe(recipe_dict(tmp_path, tiny_model_dir))
    with pytest.raises(InputError, match="distributed.strategy=single"):
        check_options(SlurmOptions(nodes=2), single)
    with pytest.raises(InputError, match="--nodes 0"):
        check_options(SlurmOptions(nodes=0), single)
    check_options(SlurmOptions(gpus_per_node=1), single)


def test_signal_delay_not_shorter_than_the_time_limit_gets_a_one_line_warning(tmp_path, tiny_model_dir, capsys):
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(tmp_path, tiny_model_dir))
    code, out, err = cli(capsys, "slurm", str(path), "--time", "2", "--signal-delay", "300", "--dry-run")
    assert code == 0 and "#SBATCH --signal=USR2@300" in out
    assert err.splitlines() == ["warning: --signal-delay 300 s is not shorter than --time 2 (120 s): the time-limit "
                                "signal comes as the job starts; lower --signal-delay or raise --time"]
    code, out, err = cli(capsys, "slurm", str(path), "--time", "10", "--signal-delay", "300", "--dry-run")
    assert code == 0 and err == ""


def test_the_follow_line_names_every_ranks_logs():
    from multitune.launch.slurm import SlurmOptions, log_paths

    folder = Path("/runs/x/slurm")
    assert log_paths(folder, "7", SlurmOptions()).split() == [f"{folder}/7_0_log.out", f"{folder}/7_0_log.err"]
    words = subprocess.run(["bash", "-c", f"echo {log_paths(folder, '7', SlurmOptions(nodes=2, tasks_per_node=3))}"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert sorted(words) == sorted(f"{folder}/7_{rank}_log.{ext}" for rank in range(6) for ext in ("out", "err"))


def test_only_pending_reasons_that_cannot_clear_stop_the_wait():
    from multitune.launch.scheduler import never_clears

    for reason in ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidQOS",
                   "QOSMaxCpuPerJobLimit", "AssocMaxWallDurationPerJobLimit", "DependencyNeverSatisfied"):
        assert never_clears(reason), reason
    for reason in ("None", "Resources", "Priority", "PartitionDown", "ReqNodeNotAvail, UnavailableNodes:vm",
                   "AssocGrpCpuLimit", "AssocMaxJobsLimit", "QOSMaxJobsPerUserLimit", "BeginTime", "Dependency",
                   "JobHeldUser"):
        assert never_clears(reason) is None, reason
