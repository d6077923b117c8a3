"""`multitune results`: finished runs (local run dirs or a W&B project) → one table (CSV, Markdown) and plots."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from multitune.atomic import atomic_file, write_atomic
from multitune.recipes.errors import InputError
from multitune.trainer.tracking import flatten

# Keys that differ between every pair of runs by construction and say nothing about the configuration.
NOT_PARAMETERS = {"output_dir", "tracking.run_name"}
FINAL_METRICS = ("final_loss", "tokens_per_s", "packing_efficiency", "steps")
EVAL_BOOKKEEPING = {"samples", "seconds"}  # in the eval result, but not a measure of the model


@dataclass
class RunResult:
    name: str
    recipe: dict[str, Any]  # flattened resolved recipe
    metrics: dict[str, float]  # final eval metrics, final loss, throughput
    runtime_s: float | None
    losses: list[tuple[int, float]] = field(default_factory=list)


def collect_local(runs_dir: Path) -> tuple[list[RunResult], int]:
    """Every finished run (metrics.json + recipe.resolved.yaml) under runs_dir; also how many were unfinished."""
    if not runs_dir.is_dir():
        raise InputError(f"runs folder not found: {runs_dir}")
    runs, unfinished = [], 0
    for recipe_file in sorted(runs_dir.rglob("recipe.resolved.yaml")):
        run_dir = recipe_file.parent
        if not (run_dir / "metrics.json").is_file():
            unfinished += 1
            continue
        metrics = _read(run_dir / "metrics.json", json.loads)
        values = {k: v for k, v in (metrics.get("after") or {}).items()
                  if isinstance(v, (int, float)) and k not in EVAL_BOOKKEEPING}
        values.update({k: metrics[k] for k in FINAL_METRICS if isinstance(metrics.get(k), (int, float))})
        losses = []
        if (run_dir / "log.jsonl").is_file():
            for entry in _read(run_dir / "log.jsonl", lambda text: [json.loads(line) for line in text.splitlines()
                                                                    if line.strip()]):
                if "eval" not in entry and "loss" in entry:
                    losses.append((entry["step"], entry["loss"]))
        name = str(run_dir.relative_to(runs_dir)) if run_dir != runs_dir else run_dir.name
        runs.append(RunResult(name, flatten(_read(recipe_file, yaml.safe_load)), values,
                              metrics.get("train_seconds"), losses))
    return runs, unfinished


def _read(path: Path, parse):
    """`parse(text of path)`; InputError naming the file when it cannot be read or parsed (a run cut short, a
    file edited by hand)."""
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot be read ({' '.join(str(exc).split())[:200]})") from None
    if isinstance(value, dict) or isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return value
    raise InputError(f"{path}: expected a JSON/YAML object, got {type(value).__name__}")


def collect_wandb(project: str, entity: str | None) -> list[RunResult]:
    """Finished runs of a W&B project, from the runs' config (the recipe) and summary (what the tracker logged)."""
    from multitune.launch.sweep import require_wandb_online

    require_wandb_online("results --wandb")
    import wandb

    api = wandb.Api()
    path = project if "/" in project else f"{entity or api.default_entity}/{project}"
    runs = []
    for run in api.runs(path, filters={"state": "finished"}):
        summary = dict(run.summary)
        values = {k.removeprefix("eval/"): v for k, v in summary.items()
                  if k.startswith("eval/") and k.removeprefix("eval/") not in EVAL_BOOKKEEPING}
        values.update({k.removeprefix("final/"): v for k, v in summary.items()
                       if k.startswith("final/") and k != "final/train_seconds"})
        if "packing_efficiency" in summary:
            values["packing_efficiency"] = summary["packing_efficiency"]
        recipe = {k: v for k, v in flatten(dict(run.config)).items() if not k.startswith("_wandb")}
        losses = [(row["_step"], row["loss"]) for row in run.scan_history(keys=["_step", "loss"])]
        runs.append(RunResult(run.name, recipe, values, summary.get("final/train_seconds", summary.get("_runtime")),
                              losses))
    return runs


def varying_keys(runs: list[RunResult]) -> list[str]:
    keys = sorted({k for run in runs for k in run.recipe} - NOT_PARAMETERS)
    return [k for k in keys if len({json.dumps(run.recipe.get(k), sort_keys=True) for run in runs}) > 1]


def build_table(runs: list[RunResult]) -> tuple[list[str], list[list[Any]]]:
    params = varying_keys(runs)
    metric_names = list(dict.fromkeys(k for run in runs for k in run.metrics))
    columns = ["run", *params, *metric_names, "runtime_s"]
    rows = [[run.name, *(run.recipe.get(k) for k in params), *(run.metrics.get(k) for k in metric_names),
             run.runtime_s] for run in runs]
    return columns, rows


def write_csv(columns: list[str], rows: list[list[Any]], path: Path) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([["" if v is None else v for v in row] for row in rows])


def markdown(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot_results(runs: list[RunResult], metric: str, out: Path) -> list[Path]:
    """loss_curves.png (all runs overlaid), and <metric>_vs_<param>.png per swept parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = varying_keys(runs)
    label = {run.name: ", ".join(f"{k}={_cell(run.recipe.get(k))}" for k in params) or run.name for run in runs}
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        if run.losses:
            ax.plot(*zip(*run.losses), label=label[run.name])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(out / "loss_curves.png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    written.append(out / "loss_curves.png")
    for param in params:
        others = [k for k in params if k != param]
        series: dict[str, list[tuple[Any, float]]] = {}
        for run in runs:
            if isinstance(run.metrics.get(metric), (int, float)):
                key = ", ".join(f"{k}={_cell(run.recipe.get(k))}" for k in others) or metric
                series.setdefault(key, []).append((run.recipe.get(param), run.metrics[metric]))
        if not series:
            continue
        numeric_x = all(isinstance(x, (int, float)) and not isinstance(x, bool) for s in series.values() for x, _ in s)
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, points in series.items():
            points.sort(key=lambda p: p[0] if numeric_x else str(p[0]))
            xs = [x if numeric_x else str(x) for x, _ in points]
            ax.plot(xs, [y for _, y in points], "o-", label=key)
        xs_all = [x for s in series.values() for x, _ in s]
        if numeric_x and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10:
            ax.set_xscale("log")
        if numeric_x and len(set(xs_all)) <= 12:  # label the swept values themselves, not a dense axis
            ticks = sorted(set(xs_all))
            ax.set_xticks(ticks, [_cell(float(t)) for t in ticks])
            ax.minorticks_off()
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{metric}_vs_{param}.png".replace("/", "_")
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _default_metric(runs: list[RunResult]) -> str:
    """exact_match, unless it is the same for every run (too little training to tell them apart): final_loss."""
    for name in ("exact_match", "final_loss"):
        if len({run.metrics.get(name) for run in runs}) > 1:
            return name
    return "exact_match" if any("exact_match" in run.metrics for run in runs) else "final_loss"


def add_parser(sub) -> None:
    p = sub.add_parser("results", help="gather finished runs into one table (CSV, Markdown) and plots")
    p.add_argument("runs_dir", nargs="?", help="folder holding run output_dirs (searched recursively)")
    p.add_argument("--wandb", metavar="PROJECT", help="read finished runs of a W&B project instead ([ENTITY/]PROJECT)")
    p.add_argument("--entity")
    p.add_argument("--out", help="where results.csv, results.md and the plots go (default: RUNS_DIR)")
    p.add_argument("--metric", help="metric to plot against swept parameters (default: exact_match, or final_loss "
                        "where exact_match is the same for every run)")


def main(args) -> int:
    if bool(args.runs_dir) == bool(args.wandb):
        raise InputError("results needs exactly one of RUNS_DIR or --wandb PROJECT")
    unfinished = 0
    if args.wandb:
        runs = collect_wandb(args.wandb, args.entity)
        out = Path(args.out or f"results-{args.wandb.replace('/', '-')}")
    else:
        runs, unfinished = collect_local(Path(args.runs_dir))
        out = Path(args.out or args.runs_dir)
    if not runs:
        raise InputError(f"no finished runs (metrics.json + recipe.resolved.yaml) in {args.runs_dir or args.wandb}")
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = build_table(runs)
    write_csv(columns, rows, out / "results.csv")
    table = markdown(columns, rows)
    write_atomic(out / "results.md", table)
    metric = args.metric or _default_metric(runs)
    if metric not in columns:
        raise InputError(f"--metric {metric}: not among the runs' metrics ({', '.join(columns[1:])})")
    plots = plot_results(runs, metric, out)
    print(table)
    note = f"; {unfinished} unfinished run(s) skipped" if unfinished else ""
    print(f"{len(runs)} runs -> {out / 'results.csv'}, {out / 'results.md'}, "
          f"{', '.join(p.name for p in plots)}{note}")
    return 0
