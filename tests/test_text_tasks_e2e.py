"""Each tiny text-task recipe trains and evaluates end to end and beats its untrained baseline; infer, eval
table, grid."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def tiny(recipe: str, tmp_path, model_dir, *extra: str):
    from multitune.recipes.loader import load_recipe

    return load_recipe(REPO / "recipes" / "debug" / recipe, [
        f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
        f"model.name_or_path={model_dir}", "model.tiny=null", *extra])


@pytest.mark.parametrize("recipe, metric, better", [
    ("tiny_rca.yaml", "rougeL", "higher"),
    ("tiny_medical_qa.yaml", "rougeL", "higher"),
    ("tiny_chat_jsonl.yaml", "answer_nll", "lower"),
])
def test_tiny_recipe_beats_its_untrained_baseline(recipe, metric, better, tmp_path, tiny_model_dir):
    from multitune.trainer.loop import train

    metrics = train(tiny(recipe, tmp_path, tiny_model_dir))
    before, after = metrics["before"][metric], metrics["after"][metric]
    assert (after > before) if better == "higher" else (after < before), (before, after)
    assert metrics["after"]["answer_nll"] < metrics["before"]["answer_nll"]


def test_mcq_logs_option_accuracy_during_training_and_learns_to_answer(tmp_path, tiny_model_dir):
    from multitune.trainer.loop import train

    recipe = tiny("tiny_medical_mcq.yaml", tmp_path, tiny_model_dir)
    metrics = train(recipe)
    assert metrics["after"]["answer_rate"] > metrics["before"]["answer_rate"]
    assert 0 <= metrics["after"]["accuracy_loglik"] <= 1 and "accuracy_generation" in metrics["after"]
    lines = [json.loads(line) for line in (recipe.output_path / "log.jsonl").read_text().splitlines()]
    periodic = [e for e in lines if e.get("eval") == "loss"]
    assert [e["step"] for e in periodic] == [10, 20]
    assert all({"loss", "accuracy_loglik"} <= set(e) for e in periodic)


def test_extraction_trains_then_infers_and_compares_base_with_adapter(tmp_path, tiny_model_dir):
    from multitune.launch.infer import run_inference
    from multitune.trainer.evaluate import evaluate_recipe
    from multitune.trainer.loop import train

    recipe = tiny("tiny_it_extraction.yaml", tmp_path, tiny_model_dir, "eval.max_samples=8",
                  "eval.max_new_tokens=48")
    metrics = train(recipe)
    assert metrics["after"]["answer_nll"] < metrics["before"]["answer_nll"] - 1.0
    adapter = recipe.output_path / "adapter"

    rows = [{k: v for k, v in r.items() if k in ("short_description", "description", "caller")}
            for r in recipe_task_rows(6)]
    new = tmp_path / "new.jsonl"
    new.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    counts = run_inference(recipe, adapter, new, out, max_new_tokens=24)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert counts["rows"] == len(written) == 6  # nothing dropped, in input order
    assert [w["input"] for w in written] == rows and [w["row"] for w in written] == list(range(6))
    for w in written:  # 24 tokens cannot hold the whole JSON: flagged as invalid, with the reason
        assert w["valid"] is False and w["problems"] and isinstance(w["output"], str)
    assert counts["invalid"] == 6

    results, table = evaluate_recipe(recipe, [adapter])
    assert list(results) == ["base", "run"]
    assert results["run"]["answer_nll"] < results["base"]["answer_nll"]
    with open(recipe.output_path / "eval" / "comparison.csv") as handle:
        header, *body = list(csv.reader(handle))
    assert header == ["metric", "base", "run"] and body[0][0] == "parse_rate"
    assert "| answer_nll" in table and (recipe.output_path / "eval" / "comparison.md").is_file()


def recipe_task_rows(n):
    from multitune.data_prep.tasks import get_task

    return get_task("it_ticket_extraction").generate(n, seed=99)


def test_grid_writes_one_table_loss_logs_and_a_plot(tmp_path, tiny_model_dir):
    from multitune.launch.cli import main

    recipe = REPO / "recipes" / "debug" / "tiny_rca.yaml"
    code = main(["grid", str(recipe), f"output_dir={tmp_path / 'g'}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"model.name_or_path={tiny_model_dir}", "model.tiny=null", "eval.before_training=false",
                 "eval.max_samples=2", "eval.max_new_tokens=4", "data.generator.n_train=60",
                 "--param", "train.max_steps=2,3", "--param", "train.lr=1e-3,5e-3"])
    assert code == 0
    grid = tmp_path / "g" / "grid"
    with open(grid / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["train.max_steps"], r["train.lr"]) for r in rows] == [("2", "1e-3"), ("2", "5e-3"), ("3", "1e-3"),
                                                                    ("3", "5e-3")]
    assert all(float(r["after_rougeL"]) >= 0 and float(r["final_loss"]) > 0 for r in rows)
    with open(grid / "losses.csv") as handle:
        losses = list(csv.DictReader(handle))
    assert sum(1 for e in losses if not e["eval"]) == 2 + 2 + 3 + 3
    assert (grid / "loss.png").stat().st_size > 1000
    assert main(["grid", str(recipe), "--param", "train.max_steps"]) == 2  # malformed: one-line error, exit 2
