"""What a run leaves in its output_dir: resolved recipe, log.jsonl, metrics.json, loss.png — each written safely."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multitune.atomic import atomic_file, write_atomic
from multitune.recipes.errors import InputError

# What makes a folder "a run": a lone recipe.resolved.yaml (a start that failed early) does not count.
RUN_FILES = ("log.jsonl", "metrics.json", "adapter", "checkpoints")
WRITTEN = (*RUN_FILES, "recipe.resolved.yaml", "loss.png", "eval", "per_class", "tracking.json", "wandb", "mlflow.db",
           "mlartifacts")


def check_output_dir(path: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an earlier run unless asked: --resume continues it, --overwrite replaces it."""
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    if resume:
        from multitune.trainer.checkpoint import list_checkpoints

        if not list_checkpoints(path / "checkpoints"):
            raise InputError(f"output_dir {path}: no complete checkpoint to resume from")
        return
    existing = [name for name in RUN_FILES if (path / name).exists()]
    if existing and not overwrite:
        raise InputError(
            f"output_dir {path} already holds a run ({', '.join(existing)}): "
            "pass --resume to continue it or --overwrite to replace it"
        )


def claim_output_dir(path: Path, resume: bool, overwrite: bool) -> None:
    """After the inputs checked out: clear what an --overwrite replaces, and make the folder."""
    check_output_dir(path, resume, overwrite)
    if not resume:
        for name in WRITTEN:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    path.mkdir(parents=True, exist_ok=True)


class RunLog:
    """log.jsonl: one JSON object per optimizer step, eval results as their own lines (with an "eval" key)."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with open(self.path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint, so each step appears once."""
        kept = [e for e in self.entries() if e.get("step", 0) <= step]
        write_atomic(self.path, "".join(json.dumps(e) + "\n" for e in kept))


def plot_loss(entries: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in entries if "loss" in e and "eval" not in e]
    losses = [e["loss"] for e in entries if "loss" in e and "eval" not in e]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, label="train loss (per target token)")
    eval_points = [(e["step"], e["loss"]) for e in entries if e.get("eval") == "loss"]
    if eval_points:
        ax.plot(*zip(*eval_points), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def write_class_reports(reports: dict, prefix: Path) -> list[Path]:
    """Per closed-set field (`json_metrics.ClassReport`): `<prefix>_<field>_report.csv` (class, precision, recall,
    f1, support; then macro avg and accuracy), `<prefix>_<field>_confusion.csv` (rows: reference, columns:
    prediction, last column: no answer) and `<prefix>_<field>_confusion.png`. Returns the files written."""
    import csv
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from multitune.data_prep.tasks.json_metrics import NO_ANSWER

    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for field, report in reports.items():
        if not report.classes:
            continue
        base = prefix.with_name(f"{prefix.name}_{field}")
        table = io.StringIO()
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        for row in zip(report.classes, report.precision, report.recall, report.f1, report.support):
            writer.writerow([row[0], *(f"{v:.4f}" for v in row[1:4]), row[4]])
        writer.writerow(["macro avg", f"{sum(report.precision) / len(report.classes):.4f}",
                         f"{sum(report.recall) / len(report.classes):.4f}", f"{report.macro_f1:.4f}",
                         sum(report.support)])
        writer.writerow(["accuracy", "", "", f"{report.accuracy:.4f}", sum(report.support)])
        write_atomic(base.with_name(base.name + "_report.csv"), table.getvalue())
        table = io.StringIO()
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(["reference \\ prediction", *report.classes, NO_ANSWER])
        writer.writerows([label, *counts] for label, counts in zip(report.classes, report.confusion))
        write_atomic(base.with_name(base.name + "_confusion.csv"), table.getvalue())
        size = max(4.0, 0.45 * len(report.classes) + 2.5)
        fig, ax = plt.subplots(figsize=(size + 1, size))
        ax.imshow(report.confusion, cmap="Blues", aspect="auto")
        ax.set_xticks(range(len(report.classes) + 1), [*report.classes, NO_ANSWER], rotation=60, ha="right")
        ax.set_yticks(range(len(report.classes)), report.classes)
        for i, counts in enumerate(report.confusion):
            for j, count in enumerate(counts):
                if count:
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=8)
        ax.set_xlabel("prediction")
        ax.set_ylabel("reference")
        ax.set_title(f"{field}: accuracy {report.accuracy:.3f}, macro-F1 {report.macro_f1:.3f}")
        fig.tight_layout()
        with atomic_file(base.with_name(base.name + "_confusion.png")) as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
        written += [base.with_name(base.name + suffix) for suffix in ("_report.csv", "_confusion.csv",
                                                                      "_confusion.png")]
    return written


def summary_table(metrics: dict[str, Any], fields: tuple[str, ...], paths: bool = True) -> str:
    """The before-vs-after table printed at the end of a run; paths=False leaves out this machine's folders (the
    adapter, the per-class tables), for the model card."""
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    lines = [f"{'metric':<16}{'before':>10}{'after':>10}", "-" * 36]
    # answer_nll (teacher-forced loss per answer token) moves long before generations parse: show it too.
    for field in (*fields, *(["answer_nll"] if "answer_nll" in after and "answer_nll" not in fields else [])):
        b = before.get(field)
        a = after.get(field)
        lines.append(f"{field:<16}{_fmt(b):>10}{_fmt(a):>10}")
    lines.append("-" * 36)
    steady = metrics.get("tokens_per_s_after_first_step")
    lines.append(f"tokens/s            {metrics['tokens_per_s']:.0f}"
                 + (f" ({steady:.0f} after the first step of {metrics['first_step_seconds']:.1f} s)"
                    if steady else ""))
    lines.append(f"packing efficiency  {metrics['packing_efficiency']:.1%}")
    if paths:
        lines.append(f"adapter             {metrics['adapter']}")
    if paths and metrics.get("per_class"):
        lines.append(f"per-class tables    {metrics['per_class']}")
    lines += [f"note: {note}" for note in metrics.get("notes") or ()]  # e.g. why a score is 0: warned at the start
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


LOAD_CHAT_ADAPTER = """```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("path/to/adapter")
tokenizer = AutoTokenizer.from_pretrained("path/to/adapter")
```

`adapter_config.json` names the base model by an absolute path (or its hub id). If the base has moved, load it
from where it is now: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("new/base"), "path/to/adapter")`
(`from peft import PeftModel`; `from transformers import AutoModelForCausalLM`).

Or merge it into a standalone model: `multitune merge --adapter path/to/adapter --out merged/` (`--base new/base`
when the base has moved)."""


def model_card(recipe_yaml: str, base_model: str, task: str, data_hash: str, metrics: dict[str, Any],
               fields: tuple[str, ...], how_to_load: str = LOAD_CHAT_ADAPTER) -> str:
    """README.md for the adapter folder: what it is, how it was made, how well it does, how to load it."""
    table = summary_table(metrics, fields, paths=False)
    return f"""---
library_name: peft
base_model: {base_model}
tags: [multitune, {task}, lora]
---
# {task} adapter (multitune)

LoRA adapter for `{base_model}`, trained by multitune on the `{task}` task.

- Data manifest hash: `{data_hash}`
- Optimizer steps: {metrics.get('steps')}, final train loss {metrics.get('final_loss')}

## Evaluation (held-out split)

```
{table}
```

## Load it

{how_to_load}

## Recipe

```yaml
{recipe_yaml.rstrip()}
```
"""


def throughput(steps: list[dict]) -> float:
    """Tokens per second over logged optimizer steps (each entry's `tokens` and `tokens_per_s`)."""
    seconds = sum(e["tokens"] / e["tokens_per_s"] for e in steps)
    return sum(e["tokens"] for e in steps) / max(seconds, 1e-9)


def finish_run(run_dir: Path, log: RunLog, tracker, task, how_to_load: str, recipe_yaml: str, base: str, *,
               before: dict | None, after: dict, examples: list[dict], adapter_dir: Path,
               write_reports: Callable[[Path, dict], None], facts: dict) -> dict:
    """Everything a finished run leaves, in one place (main process only): the final evaluation in log.jsonl and the
    tracker, metrics.json (the task's headline figures at the top level, before/after, throughput over the logged
    steps, the run's `facts`: steps, parameters, data hash, distributed layout, ...), the adapter's model card,
    loss.png, the task's own reports, and the end-of-run table on stdout. Returns the metrics."""
    log.append({"eval": "after", "step": facts["steps"], **after})
    tracker.log({f"eval/{k}": v for k, v in after.items()}, step=facts["steps"])
    steps = [e for e in log.entries() if "eval" not in e]
    metrics = {
        "task": task.name, "steps": facts["steps"],
        **{k: after[k] for k in task.headline_metrics if k in after},  # the final figures, at the top level
        "before": before, "after": after,
        "tokens_per_s": throughput(steps),
        # without the first step, which pays one-off costs (torch.compile, memory first touched): the steady rate
        "tokens_per_s_after_first_step": throughput(steps[1:]) if len(steps) > 1 else None,
        "first_step_seconds": round(steps[0]["tokens"] / steps[0]["tokens_per_s"], 2) if steps else None,
        "packing_efficiency": facts["packing_efficiency"], "final_loss": steps[-1]["loss"] if steps else None,
        **{k: v for k, v in facts.items() if k not in ("steps", "packing_efficiency")},
        "adapter": str(adapter_dir), "examples": examples,
    }
    if (run_dir / "per_class").is_dir():
        metrics["per_class"] = str(run_dir / "per_class")
    write_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False))
    tracker.summary({f"final/{k}": metrics[k] for k in ("tokens_per_s", "final_loss", "train_seconds", "steps")})
    write_atomic(adapter_dir / "README.md", model_card(recipe_yaml, base, task.name, facts["data_hash"], metrics,
                                                       task.headline_metrics, how_to_load))
    plot_loss(log.entries(), run_dir / "loss.png")
    write_reports(run_dir, after)
    print(summary_table(metrics, task.headline_metrics), flush=True)
    return metrics
