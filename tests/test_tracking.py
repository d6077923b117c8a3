"""Tracking: what a run logs to offline W&B / local MLflow (read back from disk), resume keeps the run, no secrets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import recipe_dict
from wandb_records import config as wandb_config
from wandb_records import history as wandb_history
from wandb_records import summary as wandb_summary

SECRETS = {"WANDB_API_KEY": "wandbkey-0123456789abcdef0123456789abcdef", "HF_TOKEN": "hf_FAKEtokenABCDEFGHIJKLMNOP",
           "MY_SERVICE_SECRET": "s3cr3t-value-xyz-42", "OPENAI_API_KEY": "sk-fakefakefake123456"}


def train_then_resume(tmp_path, tiny_model_dir, tracking: dict):
    """A 4-step run with checkpoints at 2 and 4, then cut back to the step-2 checkpoint and resumed to step 4."""
    from multitune.recipes.loader import validate_recipe
    from multitune.trainer.loop import train

    recipe = validate_recipe(recipe_dict(
        tmp_path, tiny_model_dir, train={"max_steps": 4, "micro_batch_tokens": 512},
        eval={"before_training": True, "max_samples": 2, "max_new_tokens": 4},
        checkpoint={"every_steps": 2, "keep_last": 5}, tracking=tracking))
    train(recipe)
    run = recipe.output_path
    first = json.loads((run / "tracking.json").read_text())
    shutil.rmtree(run / "checkpoints" / "step-4")
    train(recipe, resume=True)
    return run, first


def assert_no_secret_written(run: Path) -> None:
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)  # checkpoints and adapter are among the scanned files
    for path in files:
        data = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in data, f"{name} written to {path}"


def test_offline_wandb_run_logs_metrics_keeps_run_id_on_resume_and_writes_no_secret(
        tmp_path, tiny_model_dir, monkeypatch, capfd):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    run, first = train_then_resume(tmp_path, tiny_model_dir, {
        "mode": "offline", "project": "tests", "run_name": "tiny", "group": "g1", "tags": ["a", "b"]})

    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = {e["step"]: e for e in log if "eval" not in e}
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # the first run and its resumption ...
    assert first["backend"] == "wandb" and all(f.name == f"run-{first['run_id']}.wandb" for f in files)  # ... one id
    assert json.loads((run / "tracking.json").read_text()) == first

    logged = wandb_history(files[0]) + [row for row in wandb_history(files[1]) if row["_step"] > 2]
    by_step = {row["_step"]: row for row in logged if "loss" in row}
    assert sorted(by_step) == [1, 2, 3, 4]
    for step, row in by_step.items():
        assert row["loss"] == pytest.approx(steps[step]["loss"]) and row["lr"] == pytest.approx(steps[step]["lr"])
        assert row["grad_norm"] > 0 and row["tokens_per_s"] > 0 and row["peak_mem_gb"] > 0.05
    assert {"eval_before/exact_match", "eval_before/parse_rate"} <= set(wandb_history(files[0])[0])

    metrics = json.loads((run / "metrics.json").read_text())
    summary = wandb_summary(files[1])
    assert summary["data_hash"] == metrics["data_hash"]
    assert summary["packing_efficiency"] == pytest.approx(metrics["packing_efficiency"])
    assert summary["eval/exact_match"] == pytest.approx(metrics["after"]["exact_match"])
    assert summary["final/steps"] == 4 and summary["final/tokens_per_s"] > 0

    config = wandb_config(files[0])
    assert config["train"]["lr"] == 1e-3 and config["adapter"]["r"] == 8 and config["tracking"]["group"] == "g1"
    assert_no_secret_written(run)
    printed = capfd.readouterr()  # the console log too
    for name, value in SECRETS.items():
        assert value not in printed.out + printed.err, f"{name} printed"


def test_mlflow_local_store_logs_metrics_and_params_and_resume_continues_the_run(
        tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    run, first = train_then_resume(tmp_path, tiny_model_dir, {"backend": "mlflow", "mode": "offline",
                                                              "project": "tests", "run_name": "tiny"})
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [first["run_id"]]  # resume continued it, no second run
    tracked = runs[0]
    assert tracked.info.status == "FINISHED" and tracked.info.run_name == "tiny"
    assert tracked.data.params["train.lr"] == "0.001" and tracked.data.params["adapter.r"] == "8"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = {e["step"]: e["loss"] for e in log if "eval" not in e}
    history = {m.step: m.value for m in client.get_metric_history(tracked.info.run_id, "loss")}
    assert sorted(history) == [1, 2, 3, 4]
    assert history[4] == pytest.approx(losses[4]) and history[1] == pytest.approx(losses[1])
    metrics = json.loads((run / "metrics.json").read_text())
    assert tracked.data.tags["data_hash"] == metrics["data_hash"]
    assert tracked.data.metrics["eval/exact_match"] == pytest.approx(metrics["after"]["exact_match"])
    assert tracked.data.metrics["peak_mem_gb"] > 0.05
    assert_no_secret_written(run)


def test_secrets_from_the_environment_are_redacted_from_logged_values():
    from multitune.trainer.tracking import REDACTED, redact, secret_values

    environ = {"HF_TOKEN": "hf_abcdefghijkl", "WANDB_API_KEY": "0123456789abcdef", "PATH": "/usr/bin:/bin",
               "DB_PASSWORD": "hunter22hunter", "SHORT_KEY": "abc"}
    secrets = secret_values(environ)
    assert set(secrets) == {"hf_abcdefghijkl", "0123456789abcdef", "hunter22hunter"}
    value = {"model": {"name_or_path": "https://u:hf_abcdefghijkl@host/m"}, "tags": ["0123456789abcdef", "x"],
             "n": 3}
    assert redact(value, secrets) == {"model": {"name_or_path": f"https://u:{REDACTED}@host/m"},
                                      "tags": [REDACTED, "x"], "n": 3}


def test_online_mode_with_the_server_unreachable_logs_offline_instead_of_failing(tmp_path, monkeypatch):
    import socket

    from multitune.recipes.schema import TrackingConfig
    from multitune.trainer.tracking import Tracker

    with socket.socket() as sock:  # a free port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    tracker = Tracker(TrackingConfig(mode="online"), tmp_path, {"train": {"lr": 0.1}}, enabled=True)
    tracker.log({"loss": 2.5}, step=1)
    tracker.finish()
    run_id = json.loads((tmp_path / "tracking.json").read_text())["run_id"]
    (offline,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    assert [row["loss"] for row in wandb_history(offline)] == [2.5]
