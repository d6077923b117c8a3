"""Hyperparameter sweeps: W&B sweep files whose parameters are recipe keys, run locally, as a job array, or by W&B.

A sweep file is a W&B sweep config; `program` names the base recipe and every parameter is a dotted recipe key
(`train.lr`, `adapter.r`). Each trial is a normal `multitune train` of that recipe with the trial's values as
overrides, in its own output_dir.
"""

from __future__ import annotations

import copy
import difflib
import functools
import itertools
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from multitune.atomic import write_atomic
from multitune.launch import scheduler
from multitune.launch.jobs import ArrayOptions, check_array_options, run_command, submit_array
from multitune.recipes.errors import InputError, RunStopped
from multitune.recipes.loader import apply_override, validate_recipe
from multitune.recipes.schema import Recipe
from multitune.trainer.tracking import flatten

SWEEP_KEYS = ("program", "method", "parameters", "metric", "name", "description", "project", "entity",
              "early_terminate", "run_cap", "command")
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "log_uniform_values", "q_uniform",
                 "q_log_uniform_values")


@dataclass(frozen=True)
class Sweep:
    path: Path
    config: dict[str, Any]  # the W&B sweep config as written (what `sweep create` registers)
    program: Path  # the base recipe
    method: str
    parameters: dict[str, dict[str, Any]]  # dotted recipe key -> W&B parameter spec
    name: str


@dataclass(frozen=True)
class Trial:
    name: str
    values: dict[str, Any]
    output_dir: Path


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"sweep file not found: {path}")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: a sweep file must be a mapping (W&B sweep format)")
    return check_sweep(config, path)


def check_sweep(config: dict[str, Any], path: Path) -> Sweep:
    """Validate a sweep config against the recipe schema: every parameter key, and every value it can take."""
    for key in config:
        if key not in SWEEP_KEYS:
            close = difflib.get_close_matches(key, SWEEP_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(SWEEP_KEYS)})"
            raise InputError(f"{path}: unknown sweep key '{key}'{hint}")
    if "program" not in config:
        raise InputError(f"{path}: missing 'program' (the base recipe, e.g. program: recipes/debug/x.yaml)")
    program = Path(config["program"])
    if not program.is_file():
        raise InputError(f"{path}: program (base recipe) not found: {program}")
    method = config.get("method")
    if method not in ("grid", "random", "bayes"):
        raise InputError(f"{path}: method must be grid, random or bayes (got {method!r})")
    if not isinstance(config.get("parameters"), dict) or not config["parameters"]:
        raise InputError(f"{path}: 'parameters' must map recipe keys (e.g. train.lr) to values")
    parameters = _flatten_parameters(config["parameters"], path)
    base = yaml.safe_load(program.read_text(encoding="utf-8"))
    if not isinstance(base, dict):
        raise InputError(f"{program}: a recipe must be a mapping of sections")
    for key, spec in parameters.items():
        for value in _candidates(key, spec, path):
            _validate(base, {key: value}, f"{path}: parameter {key}={value!r}")
    if method == "grid":
        for combo in grid_values(parameters, path):
            _validate(base, combo, f"{path}: grid point {combo}")
    return Sweep(path=path, config=config, program=program, method=method, parameters=parameters,
                 name=str(config.get("name") or path.stem))


def _flatten_parameters(tree: dict[str, Any], path: Path, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Dotted keys as written, or W&B's nested form ({train: {parameters: {lr: ...}}}), both become 'train.lr'."""
    flat = {}
    for key, spec in tree.items():
        name = f"{prefix}{key}"
        if not isinstance(spec, dict):
            raise InputError(f"{path}: parameter '{name}' must be a mapping like {{values: [...]}} (got {spec!r})")
        if "parameters" in spec:
            flat.update(_flatten_parameters(spec["parameters"], path, f"{name}."))
        else:
            flat[name] = spec
    return flat


def _distribution(key: str, spec: dict[str, Any], path: Path) -> str:
    if "value" in spec:
        return "constant"
    if "values" in spec:
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise InputError(f"{path}: parameter '{key}': values must be a non-empty list")
        return spec.get("distribution", "categorical")
    if "min" in spec and "max" in spec:
        ints = isinstance(spec["min"], int) and isinstance(spec["max"], int)
        return spec.get("distribution", "int_uniform" if ints else "uniform")
    raise InputError(f"{path}: parameter '{key}' needs value, values, or min/max")


def _candidates(key: str, spec: dict[str, Any], path: Path) -> list[Any]:
    """The values to validate: all listed values, or a range's ends."""
    kind = _distribution(key, spec, path)
    if kind == "constant":
        return [spec["value"]]
    if kind == "categorical":
        return list(spec["values"])
    return [spec["min"], spec["max"]]


def _validate(base: dict[str, Any], values: dict[str, Any], where: str) -> Recipe:
    raw = copy.deepcopy(base)
    for key, value in values.items():
        apply_override(raw, override(key, value))
    return validate_recipe(raw, source=where)


def override(key: str, value: Any) -> str:
    """`key=value` with the value as JSON, which the override parser reads back as the same YAML value."""
    return f"{key}={json.dumps(value)}"


def grid_values(parameters: dict[str, dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    axes = []
    for key, spec in parameters.items():
        kind = _distribution(key, spec, path)
        if kind not in ("constant", "categorical"):
            raise InputError(f"{path}: grid search needs 'values' for parameter '{key}' (got a {kind} range)")
        axes.append([(key, v) for v in _candidates(key, spec, path)])
    return [dict(point) for point in itertools.product(*axes)]


def random_values(parameters: dict[str, dict[str, Any]], count: int, seed: int, path: Path) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    points = []
    for _ in range(count):
        point = {}
        for key, spec in parameters.items():
            kind = _distribution(key, spec, path)
            if kind == "constant":
                point[key] = spec["value"]
            elif kind == "categorical":
                point[key] = rng.choices(spec["values"], weights=spec.get("probabilities"))[0]
            elif kind == "int_uniform":
                point[key] = rng.randint(int(spec["min"]), int(spec["max"]))
            elif kind in ("uniform", "q_uniform"):
                value = rng.uniform(float(spec["min"]), float(spec["max"]))
                point[key] = round(value / spec["q"]) * spec["q"] if kind == "q_uniform" else value
            elif kind in ("log_uniform_values", "q_log_uniform_values"):
                value = math.exp(rng.uniform(math.log(float(spec["min"])), math.log(float(spec["max"]))))
                point[key] = round(value / spec["q"]) * spec["q"] if kind == "q_log_uniform_values" else value
            else:
                raise InputError(f"{path}: distribution '{kind}' of '{key}' is not supported locally "
                                 f"(supported: {', '.join(DISTRIBUTIONS)})")
        points.append(point)
    return points


def local_trials(sweep: Sweep, out: Path, count: int | None, seed: int) -> list[Trial]:
    if sweep.method == "grid":
        points = grid_values(sweep.parameters, sweep.path)
    elif sweep.method == "random":
        count = count or sweep.config.get("run_cap")
        if not count:
            raise InputError(f"{sweep.path}: a random sweep needs --count N (or run_cap in the sweep file)")
        points = random_values(sweep.parameters, int(count), seed, sweep.path)
    else:
        raise InputError(f"{sweep.path}: method {sweep.method} needs the W&B sweep server; use "
                         "`multitune sweep create` and `multitune sweep agent`, or grid/random with --local")
    if count and sweep.method == "grid":
        points = points[:count]
    base = yaml.safe_load(sweep.program.read_text())
    trials = [Trial(f"trial-{i:03d}", point, out / f"trial-{i:03d}") for i, point in enumerate(points)]
    for trial in trials:
        recipe = _validate(base, trial.values, f"{sweep.path}: trial {trial.values}")
        _check_earlier_trial(trial, flatten(recipe.model_dump(mode="json")))
    return trials


def _check_earlier_trial(trial: Trial, expected: dict[str, Any]) -> None:
    """A trial folder left by an earlier sweep run must hold the same values, or it would be skipped/resumed wrongly."""
    resolved = trial.output_dir / "recipe.resolved.yaml"
    if not resolved.is_file():
        return
    found = flatten(yaml.safe_load(resolved.read_text()))
    for key in trial.values:
        if found.get(key) != expected.get(key):
            raise InputError(f"{trial.output_dir} holds a trial with {key}={found.get(key)!r}, not "
                             f"{expected.get(key)!r}: give this sweep another --out")


def trial_command(program: Path, overrides: list[str], output_dir: Path) -> list[str]:
    """A trial is a plain `multitune train`; continue a started trial, replace one that never checkpointed."""
    from multitune.trainer.checkpoint import list_checkpoints

    command = [sys.executable, "-m", "multitune", "train", str(program), *overrides, override("output_dir",
                                                                                              str(output_dir))]
    if list_checkpoints(output_dir / "checkpoints"):
        command.append("--resume")
    elif output_dir.exists():
        command.append("--overwrite")
    return command


def trial_overrides(sweep: Sweep, trial: Trial) -> list[str]:
    overrides = [override(k, v) for k, v in trial.values.items()]
    if "tracking.group" not in trial.values:
        overrides.append(override("tracking.group", sweep.name))
    if "tracking.run_name" not in trial.values:
        overrides.append(override("tracking.run_name", f"{sweep.name}-{trial.name}"))
    return overrides


def run_local(sweep: Sweep, out: Path, count: int | None = None, seed: int = 0,
              array: ArrayOptions | None = None) -> int:
    """Run every trial not finished yet, one after another (or as one job array); returns the number that failed."""
    trials = local_trials(sweep, out, count, seed)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"sweep": str(sweep.path), "program": str(sweep.program), "method": sweep.method, "trials": [
        {"name": t.name, "values": t.values, "output_dir": str(t.output_dir), "status": "pending"} for t in trials]}
    todo = []
    for trial, entry in zip(trials, manifest["trials"]):
        if (trial.output_dir / "metrics.json").is_file():
            entry["status"] = "done"
        else:
            todo.append((trial, entry))
    print(f"[sweep] {sweep.name}: {len(trials)} trials ({len(trials) - len(todo)} already done) -> {out}",
          flush=True)
    _write_manifest(out, manifest)
    commands = [trial_command(sweep.program, trial_overrides(sweep, t), t.output_dir) for t, _ in todo]
    jobs = []
    if array is not None and commands:
        try:
            jobs = submit_array(commands, array)
        except InputError:
            if created:  # a refused submission leaves nothing behind
                shutil.rmtree(out, ignore_errors=True)
            raise
        print(f"[sweep] submitted {len(jobs)} array tasks (job {_array_id(jobs)}: {array.describe()}; logs in "
              f"{array.folder})", flush=True)
        waits = [functools.partial(_task_result, job, array.timeout_min) for job in jobs]
    else:
        waits = [functools.partial(run_command, command) for command in commands]
    failed = 0
    try:
        for i, ((_, entry), wait) in enumerate(zip(todo, waits)):
            started = time.perf_counter()
            try:
                code = wait()  # sequential: runs the trial; array: waits for its task
            except TaskFailed as exc:  # an array task killed (time limit, node failure) fails one trial
                print(f"[sweep] {entry['name']}: {exc}", flush=True)
                code = -1
            entry.update(status="done" if code == 0 else "failed", returncode=code,
                         seconds=round(time.perf_counter() - started, 1))
            failed += code != 0
            values = " ".join(f"{k}={v}" for k, v in entry["values"].items())
            print(f"[sweep] {entry['name']} ({i + 1}/{len(todo)}) {values}: {entry['status']} "
                  f"({entry['seconds']} s)", flush=True)
            _write_manifest(out, manifest)
    except KeyboardInterrupt:
        if not jobs:
            raise RunStopped("interrupted; finished trials are kept, run the sweep again to continue") from None
        _cancel(jobs)
        raise RunStopped(f"interrupted: cancelled job {_array_id(jobs)} ({len(jobs)} array tasks); finished trials "
                         "are kept, run the sweep again to continue") from None
    return failed


class TaskFailed(Exception):
    """An array task that ended without an exit code of its trial (time limit, cancelled, node failure)."""


def _array_id(jobs: list) -> str:
    return str(jobs[0].job_id).split("_", 1)[0]


def _is_slurm(job) -> bool:
    from submitit.slurm.slurm import SlurmJob

    return isinstance(job, SlurmJob)


def _task_result(job, timeout_min: int) -> int:
    """Wait for one array task; its trial's exit code. A pending reason that can never clear cancels the whole
    array and raises InputError; a task that ends without a result raises TaskFailed, in one line."""
    if _is_slurm(job):
        scheduler.wait(job)
    try:
        return job.result()
    except Exception as exc:  # noqa: BLE001 - submitit re-raises whatever ended the task
        state = job.state if _is_slurm(job) else ""
        text = str(exc)
        if "timed-out" in text or state.startswith("TIMEOUT"):
            raise TaskFailed(f"timed out: array task {job.job_id} reached its time limit (--timeout-min {timeout_min});"
                             " run the sweep again with a larger --timeout-min (a trial with a checkpoint resumes)"
                             ) from None
        last = next((line.strip() for line in reversed(text.strip().splitlines()) if line.strip()), "")
        raise TaskFailed(f"array task {job.job_id} ended {state or 'without a result'}: {last[:200]}") from None


def _cancel(jobs: list) -> None:
    if _is_slurm(jobs[0]):
        scheduler.cancel(_array_id(jobs))
    else:
        for job in jobs:
            job.cancel(check=False)


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    write_atomic(out / "sweep.json", json.dumps(manifest, indent=2))


# W&B server side: register a sweep, run agents that pull trials from it.

def require_wandb_online(what: str) -> None:
    """Fail fast, in one line, where W&B cannot be reached (no key, offline mode, no network), instead of hanging."""
    from multitune.trainer.tracking import wandb_server_problem

    if not os.environ.get("WANDB_API_KEY"):
        raise InputError(f"{what} needs the W&B server: set WANDB_API_KEY (or run a local sweep: "
                         "multitune sweep run SWEEP.yaml --local)")
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        raise InputError(f"{what} needs the W&B server, but WANDB_MODE={os.environ['WANDB_MODE']}")
    problem = wandb_server_problem()
    if problem:
        raise InputError(f"{what} needs the W&B server, which cannot be reached: {problem}")


def create(sweep: Sweep, project: str | None, entity: str | None) -> str:
    require_wandb_online("sweep create")
    import wandb

    project = project or sweep.config.get("project") or "multitune"
    sweep_id = wandb.sweep(sweep=sweep.config, project=project, entity=entity or sweep.config.get("entity"))
    return sweep_id


def agent(sweep_path: str, count: int, out: Path | None, project: str | None, entity: str | None) -> None:
    """Pull `count` trials from a registered sweep and train each one as a subprocess in its own output_dir."""
    require_wandb_online("sweep agent")
    import wandb

    *prefix, sweep_id = sweep_path.split("/")  # SWEEP_ID, PROJECT/SWEEP_ID or ENTITY/PROJECT/SWEEP_ID
    project = prefix[-1] if prefix else project or "multitune"
    entity = prefix[0] if len(prefix) == 2 else entity
    api = wandb.Api()
    config = api.sweep(f"{entity or api.default_entity}/{project}/{sweep_id}").config
    sweep = check_sweep(config, Path(f"sweep {sweep_id}"))
    out = out or Path("runs/sweeps") / sweep_id

    def trial() -> None:
        # The agent hands each trial its run id and values through the environment (wandb's pyagent contract);
        # the trial's own tracker joins that run, so metrics land in the sweep.
        run_id = os.environ["WANDB_RUN_ID"]
        params = yaml.safe_load(Path(os.environ["WANDB_SWEEP_PARAM_PATH"]).read_text())
        values = {k: v["value"] for k, v in params.items() if k != "wandb_version" and isinstance(v, dict)}
        # The server's optimiser reads the trial's metrics from W&B, whatever the base recipe tracks with.
        overrides = [override(k, v) for k, v in values.items()] + [override("tracking.mode", "online"),
                                                                   override("tracking.backend", "wandb")]
        code = run_command(trial_command(sweep.program, overrides, out / run_id))
        if code != 0:
            raise RuntimeError(f"trial {run_id} exited with code {code}")

    wandb.agent(sweep_id, function=trial, count=count, project=project, entity=entity)


# The `multitune sweep ...` command line.

def add_parser(sub) -> None:
    parser = sub.add_parser("sweep", help="hyperparameter sweeps over recipe keys (W&B sweep format)")
    commands = parser.add_subparsers(dest="sweep_command", required=True)
    p = commands.add_parser("validate", help="check a sweep file against the recipe schema; nothing runs")
    p.add_argument("sweep", help="sweep YAML (W&B format, program: base recipe, parameters: recipe keys)")
    p = commands.add_parser("run", help="run a grid/random sweep without a W&B server")
    p.add_argument("sweep")
    p.add_argument("--local", action="store_true", help="enumerate trials here (required: no W&B controller)")
    p.add_argument("--out", help="folder for the trials' output_dirs (default runs/sweeps/<name>)")
    p.add_argument("--count", type=int, help="number of trials (random; caps a grid)")
    p.add_argument("--seed", type=int, default=0, help="seed for random sampling")
    _array_args(p)
    p = commands.add_parser("create", help="register a sweep with the W&B server (needs network)")
    p.add_argument("sweep")
    p.add_argument("--project")
    p.add_argument("--entity")
    p = commands.add_parser("agent", help="run trials pulled from a registered W&B sweep")
    p.add_argument("sweep_id", help="SWEEP_ID, PROJECT/SWEEP_ID or ENTITY/PROJECT/SWEEP_ID")
    p.add_argument("--count", type=int, required=True, help="trials per agent")
    p.add_argument("--out", help="folder for the trials' output_dirs (default runs/sweeps/<id>)")
    p.add_argument("--project")
    p.add_argument("--entity")
    p.add_argument("--jobs", type=int, default=1, help="with --slurm: number of agents (array tasks)")
    _array_args(p)


def _array_args(parser) -> None:
    group = parser.add_argument_group("job array (submitit)")
    group.add_argument("--slurm", action="store_true", help="submit as a job array through submitit")
    group.add_argument("--cluster", choices=["slurm", "local", "debug"], help="submitit executor (default: auto)")
    group.add_argument("--array-folder", help="submitit logs folder (default <out>/submitit)")
    group.add_argument("--partition")
    group.add_argument("--gpus-per-node", type=int, default=0)
    group.add_argument("--cpus-per-task", type=int, help="CPUs per array task (default: the cluster's, 1 on SLURM)")
    group.add_argument("--timeout-min", type=int, default=60)
    group.add_argument("--parallelism", type=int, default=8, help="array tasks running at once")


def _array_options(args, out: Path) -> ArrayOptions | None:
    if not args.slurm:
        return None
    options = ArrayOptions(folder=Path(args.array_folder or out / "submitit"), cluster=args.cluster,
                           partition=args.partition, gpus_per_node=args.gpus_per_node,
                           cpus_per_task=args.cpus_per_task, timeout_min=args.timeout_min,
                           parallelism=args.parallelism)
    check_array_options(options)  # before any trial folder is made
    return options


def main(args) -> int:
    if args.sweep_command == "agent":
        if args.slurm:
            require_wandb_online("sweep agent")
            out = Path(args.out or Path("runs/sweeps") / args.sweep_id.split("/")[-1])
            command = [sys.executable, "-m", "multitune", "sweep", "agent", args.sweep_id, "--count",
                       str(args.count), "--out", str(out)]
            command += [f"--{k}={v}" for k, v in (("project", args.project), ("entity", args.entity)) if v]
            jobs = submit_array([command] * args.jobs, _array_options(args, out))
            print(f"[sweep] submitted {len(jobs)} agents as array tasks (job {jobs[0].job_id})")
            return 0
        agent(args.sweep_id, args.count, Path(args.out) if args.out else None, args.project, args.entity)
        return 0
    sweep = load_sweep(args.sweep)  # validated against the recipe schema before anything runs or is submitted
    if args.sweep_command == "validate":
        trials = "grid of " + str(len(grid_values(sweep.parameters, sweep.path))) if sweep.method == "grid" else \
            sweep.method
        print(f"ok: {sweep.path} ({trials} trials over {', '.join(sweep.parameters)}; base {sweep.program})")
        return 0
    if args.sweep_command == "create":
        sweep_id = create(sweep, args.project, args.entity)
        print(f"created sweep {sweep_id}; run trials with: multitune sweep agent {sweep_id} --count N")
        return 0
    if not args.local:
        raise InputError("sweep run needs --local (W&B-controlled sweeps: multitune sweep create + sweep agent)")
    out = Path(args.out or Path("runs/sweeps") / sweep.name)
    failed = run_local(sweep, out, args.count, args.seed, _array_options(args, out))
    print(f"[sweep] done: {failed} failed; table: multitune results {out}")
    return 1 if failed else 0
