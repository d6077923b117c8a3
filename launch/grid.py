"""`multitune grid`: train every combination of a few recipe overrides; one CSV of metrics, the loss logs, one plot."""

from __future__ import annotations

import csv
import itertools
import json
import re
from pathlib import Path

from multitune.atomic import atomic_file
from multitune.recipes.errors import InputError, RunStopped


def parse_params(items: list[str]) -> list[tuple[str, list[str]]]:
    """`train.max_steps=4,8` → ("train.max_steps", ["4", "8"]); each value is later parsed as YAML by the loader."""
    params = []
    for item in items:
        key, sep, values = item.partition("=")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not choices:
            raise InputError(f"--param {item!r} is not of the form key.sub=value1,value2")
        if key == "output_dir":
            raise InputError("--param output_dir: the grid chooses each run's output_dir itself")
        params.append((key, choices))
    if len({key for key, _ in params}) != len(params):
        raise InputError("--param: a key is given twice")
    return params


def run_grid(recipe_path: str, overrides: list[str], params: list[tuple[str, list[str]]]) -> Path:
    """Runs go to `<output_dir>/grid/<name>/`; writes `results.csv`, `losses.csv` and `loss.png` beside them."""
    from multitune.launch.run import run_training
    from multitune.recipes.loader import load_recipe
    from multitune.trainer.run_files import RunLog

    base = load_recipe(recipe_path, overrides)
    grid_dir = base.output_path / "grid"
    keys = [key for key, _ in params]
    runs = []
    for combo in itertools.product(*(values for _, values in params)):
        name = "_".join(f"{key.split('.')[-1]}={_safe(value)}" for key, value in zip(keys, combo)) or "base"
        settings = [f"{key}={value}" for key, value in zip(keys, combo)]
        # every combination is validated before the first one trains
        runs.append((name, dict(zip(keys, combo)),
                     load_recipe(recipe_path, [*overrides, *settings, f"output_dir={grid_dir / name}"])))

    rows, losses = [], []
    for name, settings, recipe in runs:
        print(f"[multitune grid] run {name}", flush=True)
        code = run_training(recipe, resume=False, overwrite=True)
        if code != 0:
            raise RunStopped(f"grid stopped in run {name} (exit code {code}); runs before it are in {grid_dir}")
        metrics = json.loads((recipe.output_path / "metrics.json").read_text())
        row = {"run": name, **settings, "final_loss": metrics["final_loss"],
               "train_seconds": metrics["train_seconds"], "tokens_per_s": round(metrics["tokens_per_s"], 1)}
        row.update({f"before_{k}": v for k, v in (metrics["before"] or {}).items() if _is_number(v)})
        row.update({f"after_{k}": v for k, v in metrics["after"].items() if _is_number(v)})
        rows.append(row)
        losses += [{"run": name, "step": e["step"], "loss": e["loss"], "eval": e.get("eval", "")}
                   for e in RunLog(recipe.output_path / "log.jsonl").entries() if "loss" in e]
    _write_csv(grid_dir / "results.csv", rows)
    _write_csv(grid_dir / "losses.csv", losses)
    plot_runs(losses, grid_dir / "loss.png")
    return grid_dir


def plot_runs(losses: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in dict.fromkeys(e["run"] for e in losses):
        points = [(e["step"], e["loss"]) for e in losses if e["run"] == name and not e["eval"]]
        if points:
            ax.plot(*zip(*points), label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (per target token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _safe(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", value.rsplit("/", 1)[-1])[:40]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
