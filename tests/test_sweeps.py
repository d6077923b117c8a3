"""Sweeps and results: a local 2x2 grid runs 4 real trials and tabulates them; bad sweep files stop before any run."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, recipe_dict, write_recipe
from test_trainer import assert_one_line_error, run_cli

from multitune.recipes.errors import InputError


def tiny_base(tmp_path, tiny_model_dir):
    return write_recipe(tmp_path / "base.yaml", recipe_dict(
        tmp_path, tiny_model_dir, train={"max_steps": 2, "micro_batch_tokens": 512},
        eval={"before_training": False, "max_samples": 2, "max_new_tokens": 4}, checkpoint={"every_steps": None}))


def write_sweep(tmp_path, program, parameters, method="grid", **extra):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "program": str(program), "method": method,
                                    "metric": {"name": "eval/exact_match", "goal": "maximize"},
                                    "parameters": parameters, **extra}))
    return path


@pytest.mark.slow
def test_local_grid_sweep_runs_every_trial_and_results_table_has_one_row_each(tmp_path, tiny_model_dir, capsys):
    from multitune.launch.cli import main

    lrs, ranks = [1e-3, 2e-3], [4, 8]
    sweep = write_sweep(tmp_path, tiny_base(tmp_path, tiny_model_dir),
                        {"train.lr": {"values": lrs}, "adapter": {"parameters": {"r": {"values": ranks}}}})
    out = tmp_path / "sweep-out"
    result = run_cli("sweep", "run", str(sweep), "--local", "--out", str(out))
    manifest = json.loads((out / "sweep.json").read_text())
    assert [t["status"] for t in manifest["trials"]] == ["done"] * 4, result.stdout
    for trial in manifest["trials"]:  # each trial is a normal run with its own values, in its own output_dir
        resolved = yaml.safe_load((out / trial["name"] / "recipe.resolved.yaml").read_text())
        assert resolved["train"]["lr"] == trial["values"]["train.lr"]
        assert resolved["adapter"]["r"] == trial["values"]["adapter.r"]
        assert resolved["output_dir"] == str(out / trial["name"]) and resolved["tracking"]["group"] == "tiny"
        assert (out / trial["name"] / "metrics.json").is_file()

    assert main(["results", str(out), "--metric", "final_loss"]) == 0
    table = capsys.readouterr().out
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    assert {(float(r["train.lr"]), int(r["adapter.r"])) for r in rows} == set(itertools.product(lrs, ranks))
    assert "output_dir" not in rows[0] and "tracking.group" not in rows[0]  # only keys that vary, no run names
    for row in rows:
        metrics = json.loads((out / row["run"] / "metrics.json").read_text())
        assert float(row["final_loss"]) == pytest.approx(metrics["final_loss"])
        assert float(row["exact_match"]) == pytest.approx(metrics["after"]["exact_match"])
        assert float(row["runtime_s"]) == pytest.approx(metrics["train_seconds"])
    markdown = (out / "results.md").read_text().splitlines()
    assert len(markdown) == 2 + 4 and "train.lr" in markdown[0] and "adapter.r" in markdown[0]
    assert markdown[0] in table and "seconds" not in markdown[0]  # eval bookkeeping is not a metric column
    for plot in ("loss_curves.png", "final_loss_vs_train.lr.png", "final_loss_vs_adapter.r.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["sweep", "run", str(sweep), "--local", "--out", str(out)]) == 0  # finished trials are not rerun
    again = capsys.readouterr().out
    assert "4 trials (4 already done)" in again and "trial-000 (" not in again


@pytest.mark.slow
def test_sweep_as_job_array_through_submitit(tmp_path, tiny_model_dir):
    """The --slurm path on submitit's local executor (real pickled jobs in their own processes, no cluster)."""
    sweep = write_sweep(tmp_path, tiny_base(tmp_path, tiny_model_dir), {"train.lr": {"values": [2e-3]}})
    out = tmp_path / "array-out"
    result = run_cli("sweep", "run", str(sweep), "--local", "--slurm", "--cluster", "local", "--out", str(out))
    assert "submitted 1 array tasks" in result.stdout
    manifest = json.loads((out / "sweep.json").read_text())
    assert [t["status"] for t in manifest["trials"]] == ["done"]
    assert yaml.safe_load((out / "trial-000" / "recipe.resolved.yaml").read_text())["train"]["lr"] == 2e-3
    assert (out / "trial-000" / "metrics.json").is_file()
    assert list((out / "submitit").glob("*_result.pkl"))  # results came back through submitit's job folder


@pytest.mark.parametrize("parameters, fragment", [
    ({"train.lrr": {"values": [1e-3]}}, "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    ({"trian.lr": {"values": [1e-3]}}, "unknown key 'trian' (did you mean 'train'?)"),
    ({"adapter": {"parameters": {"rank": {"values": [4]}}}}, "unknown key 'adapter.rank'"),
    ({"train.lr": {"values": [1e-3, -1]}}, "train.lr: Input should be greater than 0"),
    ({"train.lr": {"min": 1e-5, "max": 1e-3}}, "grid search needs 'values' for parameter 'train.lr'"),
])
def test_bad_sweep_file_is_rejected_before_anything_runs(tmp_path, tiny_model_dir, capsys, parameters, fragment):
    from multitune.launch.cli import main

    sweep = write_sweep(tmp_path, tiny_base(tmp_path, tiny_model_dir), parameters)
    out = tmp_path / "never"
    assert main(["sweep", "run", str(sweep), "--local", "--out", str(out)]) == 2
    stderr = capsys.readouterr().err
    assert fragment in stderr
    assert_one_line_error(stderr)
    assert not out.exists() and not (tmp_path / "run").exists()


def test_sweep_create_and_agent_fail_in_one_line_without_the_wandb_server(tmp_path, tiny_model_dir, capsys,
                                                                          monkeypatch):
    from multitune.launch.cli import main

    sweep = write_sweep(tmp_path, tiny_base(tmp_path, tiny_model_dir), {"train.lr": {"values": [1e-3]}})
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert main(["sweep", "create", str(sweep)]) == 2
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert main(["sweep", "agent", "someone/proj/abc123", "--count", "1"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert "set WANDB_API_KEY" in errors[0] and "cannot be reached: 127.0.0.1:9" in errors[1]
    assert len(errors) == 2


def test_random_sweep_samples_reproducibly_within_ranges(tmp_path, tiny_model_dir):
    from multitune.launch.sweep import load_sweep, local_trials

    sweep = load_sweep(write_sweep(tmp_path, tiny_base(tmp_path, tiny_model_dir), {
        "train.lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2},
        "adapter.r": {"values": [4, 8, 16]}, "train.warmup_steps": {"min": 0, "max": 5}}, method="random"))
    trials = local_trials(sweep, tmp_path / "o", count=20, seed=3)
    assert trials == local_trials(sweep, tmp_path / "o", count=20, seed=3)
    assert len({t.values["train.lr"] for t in trials}) == 20
    assert all(1e-5 <= t.values["train.lr"] <= 1e-2 for t in trials)
    assert {t.values["adapter.r"] for t in trials} == {4, 8, 16}
    assert all(isinstance(t.values["train.warmup_steps"], int) and 0 <= t.values["train.warmup_steps"] <= 5
               for t in trials)
    lrs = sorted(t.values["train.lr"] for t in trials)  # log-uniform: about half the draws below 3e-4
    assert 4 <= sum(lr < 3.2e-4 for lr in lrs) <= 16


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "recipes" / "sweeps").glob("*.yaml")))
def test_shipped_sweep_files_validate_against_the_recipe_schema(name, monkeypatch):
    from multitune.launch.sweep import load_sweep

    monkeypatch.chdir(REPO)  # programs are paths relative to the repository root, as the CLI sees them
    sweep = load_sweep(Path("recipes/sweeps") / name)
    assert sweep.parameters and sweep.program.is_file()


def test_trial_folder_from_a_different_sweep_is_refused_not_skipped(tmp_path, tiny_model_dir):
    from multitune.launch.sweep import load_sweep, local_trials
    from multitune.recipes.loader import dump_recipe, load_recipe

    base = tiny_base(tmp_path, tiny_model_dir)
    sweep = load_sweep(write_sweep(tmp_path, base, {"train.lr": {"values": [1e-3, 2e-3]}}))
    earlier = tmp_path / "out" / "trial-001"
    earlier.mkdir(parents=True)
    (earlier / "recipe.resolved.yaml").write_text(dump_recipe(load_recipe(base, ["train.lr=5e-3"])))
    (earlier / "metrics.json").write_text("{}")
    with pytest.raises(InputError, match="trial-001 holds a trial with train.lr=0.005, not 0.002"):
        local_trials(sweep, tmp_path / "out", count=None, seed=0)
    (earlier / "recipe.resolved.yaml").write_text(dump_recipe(load_recipe(base, ["train.lr=2e-3"])))
    assert [t.values["train.lr"] for t in local_trials(sweep, tmp_path / "out", count=None, seed=0)] == [1e-3, 2e-3]
