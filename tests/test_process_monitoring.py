"""Process monitoring: event-log reading and checks, features and targets, split, leakage, heads round trip, e2e."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, TINY_SPEC

from multitune.recipes.errors import InputError
from multitune.recipes.schema import DataConfig, EventColumns, ProcessConfig

HAND_LOG = """case,activity,time,resource,amount
A,register,2024-01-01 09:00:00,ann,10
A,check,2024-01-01 12:00:00,bob,10
A,pay,2024-01-02 09:00:00,ann,10
B,register,2024-01-03 10:00:00,bob,20
B,pay,2024-01-05 16:30:00,ann,20
C,register,2024-01-04 08:00:00,ann,30
C,check,2024-01-04 08:30:00,bob,30
C,check,2024-01-04 09:30:00,bob,30
C,pay,2024-01-04 10:00:00,ann,30
"""
COLUMNS = EventColumns(case="case", activity="activity", timestamp="time", categorical=["resource"],
                       continuous=["amount"])


def write(tmp_path: Path, text: str, name: str = "log.csv") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(text)
    return path


def prepared_hand_log(tmp_path, eval_cases=1, text=HAND_LOG):
    from multitune.data_prep.tasks.process_monitoring.eventlog import read_event_log
    from multitune.data_prep.tasks.process_monitoring.features import prepare_events

    frame = read_event_log(write(tmp_path, text), COLUMNS)
    data = DataConfig(train_file="log.csv", max_seq_len=16, cache_dir=str(tmp_path / "cache"))
    return prepare_events(frame, data, ProcessConfig(columns=COLUMNS), {"test": text}, eval_cases)


def case_rows(prepared, split):
    from multitune.data_prep.shards import ShardedDataset

    data = ShardedDataset(prepared.split(split))
    return {data.record_json(i): i for i in range(len(data))}, data


def test_hand_written_log_gives_the_known_features_and_targets(tmp_path):
    from multitune.data_prep.tasks.process_monitoring.eventlog import read_event_log
    from multitune.data_prep.tasks.process_monitoring.features import END, time_features

    frame = read_event_log(write(tmp_path, HAND_LOG), COLUMNS)
    times = time_features(frame, COLUMNS).assign(case=frame["case"].to_numpy())
    a = times[times["case"] == "A"]
    assert a["next_activity"].tolist() == ["check", "pay", END]
    np.testing.assert_allclose(a["remaining_days"], [1.0, 0.875, 0.0])
    np.testing.assert_allclose(a["days_since_start"], [0.0, 0.125, 1.0])
    np.testing.assert_allclose(a["days_since_previous"], [0.0, 0.125, 0.875])
    assert a["weekday"].tolist() == [0, 0, 1]  # 2024-01-01 was a Monday
    np.testing.assert_allclose(a["hour"], [9, 12, 9])
    b = times[times["case"] == "B"]
    np.testing.assert_allclose(b["remaining_days"], [2.270833333, 0.0])
    np.testing.assert_allclose(b["hour"], [10, 16.5])

    # In the shards: labels are the next activity's class, remaining time in units of the train mean.
    prepared = prepared_hand_log(tmp_path)
    vocab = prepared.manifest["vocab"]["activity"]
    rows, train = case_rows(prepared, "train")
    assert set(rows) == {"A", "B"}  # C starts last: the eval split
    labels = [vocab[i] for i in train.tokens(rows["A"], "next_activity")]
    assert labels == ["check", "pay", END]
    scale = prepared.manifest["remaining_scale_days"]
    assert scale == pytest.approx(np.mean([1.0, 0.875, 0.0, 2.270833333, 0.0]))
    np.testing.assert_allclose(train.tokens(rows["A"], "remaining") * scale, [1.0, 0.875, 0.0], rtol=1e-5)
    # Continuous inputs are z-scored with the statistics of the train events only.
    raw_amount_train = np.array([10, 10, 10, 20, 20.0])
    index = prepared.manifest["continuous"].index("amount")
    assert prepared.manifest["mean"][index] == pytest.approx(raw_amount_train.mean())
    assert prepared.manifest["std"][index] == pytest.approx(raw_amount_train.std())
    _, held_out = case_rows(prepared, "eval")
    amount_c = held_out.tokens(0, "continuous").reshape(4, -1)[:, index]
    np.testing.assert_allclose(amount_c, (30 - raw_amount_train.mean()) / raw_amount_train.std(), rtol=1e-5)


def test_inputs_hold_no_target_and_labels_are_the_next_event(tmp_path):
    """Position i sees events 0..i only; its label is event i+1's activity (END after the last). Changing a later
    event must leave every earlier position's inputs unchanged: an off-by-one shift either way fails here."""
    prepared = prepared_hand_log(tmp_path / "one")
    changed_text = HAND_LOG.replace("A,pay,2024-01-02 09:00:00,ann,10", "A,check,2024-01-03 15:00:00,bob,10")
    changed = prepared_hand_log(tmp_path / "two", text=changed_text)
    rows, train = case_rows(prepared, "train")
    rows2, train2 = case_rows(changed, "train")
    end = prepared.manifest["vocab"]["activity"].index("<end>")
    for i in rows.values():
        ids, labels = train.tokens(i, "activity"), train.tokens(i, "next_activity")
        assert labels[:-1].tolist() == ids[1:].tolist() and labels[-1] == end
    # Upstream of normalisation: the inputs of A's first two events are unchanged, their targets are not.
    from multitune.data_prep.tasks.process_monitoring.eventlog import read_event_log
    from multitune.data_prep.tasks.process_monitoring.features import continuous_matrix, time_features

    def case_a(text, folder):
        frame = read_event_log(write(tmp_path / folder, text), COLUMNS)
        times = time_features(frame, COLUMNS)
        inputs = np.column_stack([continuous_matrix(frame, times, COLUMNS), frame["activity"].factorize()[0],
                                  frame["resource"].factorize()[0]])
        at = (frame["case"] == "A").to_numpy()
        return inputs[at], times[at]

    inputs, targets = case_a(HAND_LOG, "raw1")
    inputs2, targets2 = case_a(changed_text, "raw2")
    np.testing.assert_array_equal(inputs[:2], inputs2[:2])
    assert not np.array_equal(inputs[2], inputs2[2])
    assert targets["next_activity"].iloc[1] != targets2["next_activity"].iloc[1]
    assert targets["remaining_days"].iloc[0] != targets2["remaining_days"].iloc[0]


@pytest.mark.parametrize("backbone", ["lstm", "causal_lm"])
def test_model_outputs_at_a_prefix_ignore_later_events_and_other_packed_cases(backbone, tiny_model_dir, tmp_path):
    """Causality and isolation of the backbone: a packed row gives the same predictions as each case alone, and
    editing a case's later events leaves its earlier predictions unchanged."""
    from multitune.trainer.process_monitoring import EventBatch, predict
    from multitune.trainer.sequence_model import build_sequence_model

    torch.manual_seed(0)
    spec = _spec(backbone, tiny_model_dir)
    model = build_sequence_model(spec, torch.device("cpu")).eval()
    rng = np.random.default_rng(0)
    cases = [(rng.integers(3, 8, size=(n, 3)), rng.normal(size=(n, 5)).astype(np.float32)) for n in (5, 3, 6)]

    def batch(rows):
        cat = np.concatenate([c for c, _ in rows])
        cont = np.concatenate([x for _, x in rows])
        pos = np.concatenate([np.arange(len(c)) for c, _ in rows])
        seg = np.concatenate([np.full(len(c), k) for k, (c, _) in enumerate(rows)])
        t = lambda a, dt=torch.long: torch.as_tensor(a, dtype=dt)[None]  # noqa: E731
        n = len(pos)
        return EventBatch(t(cat), t(cont, torch.float32), t(pos), t(seg), t(np.zeros(n)), t(np.zeros(n),
                          torch.float32), t(np.full(n, -1)), n, n)

    with torch.no_grad():
        packed, _ = predict(model, batch(cases), torch.float32)
        start = 0
        for case in cases:
            alone, _ = predict(model, batch([case]), torch.float32)
            torch.testing.assert_close(packed[0, start:start + len(case[0])], alone[0], atol=1e-5, rtol=1e-5)
            start += len(case[0])
        edited = (cases[0][0].copy(), cases[0][1].copy())
        edited[0][3:] = 7
        edited[1][3:] += 5.0
        before, _ = predict(model, batch([cases[0]]), torch.float32)
        after, _ = predict(model, batch([edited]), torch.float32)
    torch.testing.assert_close(before[0, :3], after[0, :3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before[0, 3:], after[0, 3:])


def test_split_puts_every_case_on_one_side_latest_starts_in_eval(tmp_path):
    from multitune.data_prep.tasks.process_monitoring.eventlog import check_events
    from multitune.data_prep.tasks.process_monitoring.features import split_by_start
    from multitune.data_prep.tasks.process_monitoring.generator import generate_log

    columns = EventColumns(categorical=[], continuous=[])
    frame = check_events(generate_log(300, seed=3).events.sample(frac=1.0, random_state=0), columns, "gen", 1)
    train, held_out = split_by_start(frame, columns, 60)
    train_cases, eval_cases = set(train[columns.case]), set(held_out[columns.case])
    assert not train_cases & eval_cases and len(eval_cases) == 60 and len(train_cases) == 240
    assert len(train) + len(held_out) == len(frame)
    starts = frame.groupby(columns.case)[columns.timestamp].min()
    assert starts[list(train_cases)].max() <= starts[list(eval_cases)].min()


def test_generator_is_seeded_and_its_bayes_predictor_is_the_posterior_argmax():
    from multitune.data_prep.tasks.process_monitoring.generator import CaseState, generate_log, next_distribution

    one, two = generate_log(200, seed=5), generate_log(200, seed=5)
    pd.testing.assert_frame_equal(one.events, two.events)
    assert not generate_log(200, seed=6).events.equals(one.events)
    # The posterior depends on attributes and history, as designed.
    assert next_distribution(CaseState("Request For Payment APPROVED by ADMINISTRATION", "organizational unit 1",
                                       5000.0, 0)) != next_distribution(
        CaseState("Request For Payment APPROVED by ADMINISTRATION", "organizational unit 1", 50.0, 0))
    log = generate_log(3000, seed=1)
    events = log.events
    # Realised accuracy of the Bayes predictor ≈ its expected accuracy (mean max posterior), within noise.
    hits, probs = [], []
    for case, group in events.groupby("case:concept:name", sort=False):
        nexts = group["concept:name"].tolist()[1:] + ["<end>"]
        for (best, p), actual in zip(log.bayes[case], nexts):
            hits.append(best == actual)
            probs.append(p)
    assert abs(np.mean(hits) - np.mean(probs)) < 0.01
    assert 0.8 < np.mean(probs) < 0.97  # neither trivial nor hopeless


def test_xes_reads_like_the_same_log_as_csv(tmp_path):
    from multitune.data_prep.tasks.process_monitoring.eventlog import read_event_log

    xes = """<?xml version="1.0" encoding="UTF-8"?>
<log xes.version="1.0" xmlns="http://www.xes-standard.org/">
  <global scope="trace"><string key="concept:name" value="__INVALID__"/></global>
  <string key="concept:name" value="the log"/>
  <trace><string key="concept:name" value="A"/><float key="Amount" value="10"/>
    <event><string key="concept:name" value="register"/><string key="org:resource" value="ann"/>
      <date key="time:timestamp" value="2024-01-01T09:00:00.000+00:00"/></event>
    <event><string key="concept:name" value="pay"/><string key="org:resource" value="bob"/>
      <date key="time:timestamp" value="2024-01-01T12:00:00.000+01:00"/></event>
  </trace>
  <trace><string key="concept:name" value="B"/><float key="Amount" value="20"/>
    <event><string key="concept:name" value="register"/><string key="org:resource" value="bob"/>
      <date key="time:timestamp" value="2024-01-02T09:00:00.000+00:00"/></event>
  </trace>
</log>"""
    columns = EventColumns(continuous=["case:Amount"])
    frame = read_event_log(write(tmp_path, xes, "log.xes"), columns)
    assert frame["case:concept:name"].tolist() == ["A", "A", "B"]
    assert frame["concept:name"].tolist() == ["register", "pay", "register"]
    assert frame["org:resource"].tolist() == ["ann", "bob", "bob"]
    assert frame["case:Amount"].tolist() == [10.0, 10.0, 20.0]
    assert frame["time:timestamp"].iloc[1] == pd.Timestamp("2024-01-01 11:00", tz="UTC")
    import gzip

    (tmp_path / "log.xes.gz").write_bytes(gzip.compress(xes.encode()))
    pd.testing.assert_frame_equal(read_event_log(tmp_path / "log.xes.gz", columns), frame)
    with pytest.raises(InputError, match=r"log.xes: missing column 'org:role' \(columns: "):
        read_event_log(tmp_path / "log.xes", EventColumns(categorical=["org:role"]))


@pytest.mark.parametrize("text, message", [
    (HAND_LOG.replace("resource", "who"), "log.csv: missing column 'resource'"),
    (HAND_LOG.replace("2024-01-01 12:00:00", "noon on monday"),
     "log.csv: column 'time' row 3: unparsable timestamp ('noon on monday')"),
    (HAND_LOG.replace("B,pay,2024-01-05 16:30:00,ann,20", "B,pay,2024-01-05 16:30:00,ann,"),
     "log.csv: column 'amount' row 6: not a finite number (nan)"),
    (HAND_LOG.replace("B,pay,2024-01-05 16:30:00,ann,20", "B,pay,2024-01-05 16:30:00,ann,n/a"),
     "log.csv: column 'amount' row 6: not a finite number ('n/a')"),
    (HAND_LOG.replace("C,check,2024-01-04 08:30:00,bob,30", "C,check,2024-01-04 08:30:00,,30"),
     "log.csv: column 'resource' row 8: missing value (or set process.columns.fill_missing)"),
])
def test_bad_event_logs_fail_with_one_line_naming_file_column_row(tmp_path, text, message):
    from multitune.data_prep.tasks.process_monitoring.eventlog import read_event_log

    with pytest.raises(InputError) as error:
        read_event_log(write(tmp_path, text), COLUMNS)
    assert str(error.value).startswith(f"{tmp_path / 'log.csv'}: {message.split(': ', 1)[1]}")
    assert "\n" not in str(error.value)


def test_unsorted_events_are_sorted_stably_with_a_warning(tmp_path, caplog):
    from multitune.data_prep.tasks.process_monitoring.eventlog import read_event_log

    lines = HAND_LOG.splitlines()
    shuffled = "\n".join([lines[0], lines[3], lines[1], lines[2], *lines[4:]]) + "\n"  # A's pay before register
    with caplog.at_level(logging.WARNING):
        frame = read_event_log(write(tmp_path, shuffled), COLUMNS)
    assert "events of 1 case(s) (first: A) were not in time order" in caplog.text
    reference = read_event_log(write(tmp_path, HAND_LOG, "ref.csv"), COLUMNS)
    pd.testing.assert_frame_equal(frame, reference)


def test_cli_reports_a_bad_log_in_one_line_with_exit_code_2(tmp_path, capsys):
    from multitune.launch.cli import main

    log = write(tmp_path, HAND_LOG.replace("2024-01-02 09:00:00", "yesterday"))
    recipe = write(tmp_path, json.dumps({
        "task": "process_monitoring", "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": "lstm", "dtype": "float32"}, "adapter": {"kind": "none"},
        "process": {"backbone": "lstm", "columns": COLUMNS.model_dump()},
        "data": {"train_file": str(log), "cache_dir": str(tmp_path / "cache"), "eval_fraction": 0.3},
    }), "recipe.yaml")
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {log}: column 'time' row 4: unparsable timestamp ('yesterday')")
    assert main(["eval", str(recipe)]) == 2  # chat-only commands refuse before loading anything
    assert "`multitune train` evaluates it" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _spec(backbone: str, tiny_model_dir: Path) -> dict:
    from multitune.recipes.schema import AdapterConfig, ModelConfig
    from multitune.trainer.sequence_model import model_spec

    manifest = {"categorical": ["activity", "resource", "unit"], "continuous": ["a", "b", "c", "d", "e"],
                "vocab": {"activity": list("abcdefgh"), "resource": list("abcdefgh"), "unit": list("abcdefgh")},
                "mean": [0.0] * 5, "std": [1.0] * 5, "remaining_scale_days": 1.0}
    process = ProcessConfig(backbone=backbone, rnn_hidden_size=32, combine="concat", embed_dim=8)
    adapter = AdapterConfig(kind="lora" if backbone == "causal_lm" else "none", r=4, alpha=8, dropout=0.0)
    model = ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32")
    return model_spec(model, adapter, process, manifest)


@pytest.mark.parametrize("backbone", ["gru", "causal_lm"])
def test_heads_and_input_layer_round_trip_with_the_adapter(backbone, tiny_model_dir, tmp_path):
    """Save (PEFT adapter + input layer + heads) and load back: identical predictions. Every trainable weight is
    moved off its initial value first, so a weight that is not saved or not loaded changes the predictions."""
    from multitune.trainer.process_monitoring import EventBatch, predict
    from multitune.trainer.sequence_model import build_sequence_model, load_sequence_model, save_sequence_model

    torch.manual_seed(1)
    model = build_sequence_model(_spec(backbone, tiny_model_dir), torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_sequence_model(model, weights, _spec(backbone, tiny_model_dir), tmp_path / "adapter")
    if backbone == "causal_lm":
        assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    loaded, _ = load_sequence_model(tmp_path / "adapter", torch.device("cpu"))
    n = 7
    batch = EventBatch(torch.randint(2, 8, (1, n, 3)), torch.randn(1, n, 5), torch.arange(n)[None],
                       torch.zeros(1, n, dtype=torch.long), torch.zeros(1, n, dtype=torch.long), torch.zeros(1, n),
                       torch.full((1, n), -1), n, n)
    model.eval()
    with torch.no_grad():
        expected, loaded_out = predict(model, batch, torch.float32), predict(loaded, batch, torch.float32)
        fresh = build_sequence_model(_spec(backbone, tiny_model_dir), torch.device("cpu")).eval()
        untrained = predict(fresh, batch, torch.float32)
    assert torch.equal(expected[0], loaded_out[0]) and torch.equal(expected[1], loaded_out[1])
    assert not torch.allclose(expected[0], untrained[0])


@pytest.mark.slow
@pytest.mark.parametrize("recipe_name", ["tiny_process_rnn", "tiny_process_llm"])
def test_debug_recipes_reach_the_bayes_optimal_accuracy(recipe_name, tmp_path, tiny_model_dir):
    """The shipped debug recipes end to end: within 3 points of the Bayes-optimal next-activity accuracy, metrics and
    plot written, and the saved model reloads to the same accuracy."""
    from multitune.data_prep.shards import ShardedDataset
    from multitune.data_prep.tasks import task_for
    from multitune.recipes.loader import load_recipe
    from multitune.trainer.loop import train
    from multitune.trainer.process_monitoring import EventWorkload
    from multitune.trainer.sequence_model import load_sequence_model

    overrides = [f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    if recipe_name == "tiny_process_llm":
        overrides += [f"model.name_or_path={tiny_model_dir}", f"model.tiny={json.dumps(TINY_SPEC)}"]
    recipe = load_recipe(REPO / "recipes" / "debug" / f"{recipe_name}.yaml", overrides)
    metrics = train(recipe)
    assert metrics["bayes_optimal_acc"] - metrics["next_activity_acc"] <= 0.03, metrics
    assert 0 < metrics["remaining_time_mae_days"] < 4.0
    run = tmp_path / "run"
    on_disk = json.loads((run / "metrics.json").read_text())
    assert {"next_activity_acc", "remaining_time_mae_days", "bayes_optimal_acc"} <= set(on_disk)
    assert (run / "per_prefix.png").stat().st_size > 0
    assert set(json.loads((run / "per_prefix.json").read_text())) >= {"1", "2", "3"}

    model, _ = load_sequence_model(run / "adapter", torch.device("cpu"))
    work = EventWorkload(recipe, task_for(recipe))
    prepared = work.prepare()
    assert prepared.cache_hit
    reloaded, _ = work.evaluate(model, ShardedDataset(prepared.split("eval")), torch.device("cpu"))
    assert reloaded["next_activity_acc"] == metrics["next_activity_acc"]
    assert reloaded["remaining_time_mae_days"] == pytest.approx(metrics["remaining_time_mae_days"], abs=1e-3)


def test_qlora_backbone_checkpoints_and_resumes_to_the_same_run(tmp_path, tiny_model_dir):
    """QLoRA (NF4 AutoModel body + LoRA) with heads through the shared loop: a run resumed from its step-3
    checkpoint logs the same losses and ends with the same metrics as the uninterrupted run."""
    import shutil

    from multitune.recipes.loader import validate_recipe
    from multitune.trainer.loop import train

    recipe = {
        "task": "process_monitoring", "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32", "compute_dtype": "float32",
                  "quantization": "nf4"},
        "adapter": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "process": {"backbone": "causal_lm", "combine": "concat", "embed_dim": 16,
                    "columns": {"categorical": ["org:resource", "case:OrganizationalEntity"],
                                "continuous": ["case:Amount"]}},
        "data": {"generator": {"n_train": 120, "n_eval": 30, "seed": 2}, "max_seq_len": 32,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 6, "lr": 3e-3, "micro_batch_tokens": 128, "grad_accum": 2},
        "eval": {"before_training": True, "every_steps": 3},
        "checkpoint": {"every_steps": 3, "keep_last": 3},
    }
    full = train(validate_recipe(recipe))
    run = tmp_path / "run"
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step-6")
    for name in ("adapter", "metrics.json"):
        target = resumed_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    resumed = train(validate_recipe({**recipe, "output_dir": str(resumed_dir)}), resume=True)
    losses = [[e["loss"] for e in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "eval" not in e]
              for d in (run, resumed_dir)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    assert resumed["next_activity_acc"] == full["next_activity_acc"]
    assert full["before"]["next_activity_acc"] != full["next_activity_acc"]  # training changed the predictions


def test_frozen_backbone_trains_only_the_input_layer_and_heads(tiny_model_dir):
    from multitune.recipes.schema import AdapterConfig
    from multitune.trainer.sequence_model import build_sequence_model

    spec = _spec("causal_lm", tiny_model_dir)
    spec["adapter"] = AdapterConfig(kind="none").model_dump()
    spec["process"]["freeze_backbone"] = True
    model = build_sequence_model(spec, torch.device("cpu"))
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"inputs", "next_activity", "remaining_time"}
    spec["process"]["freeze_backbone"] = False  # full fine-tuning: the backbone trains too
    full = build_sequence_model(spec, torch.device("cpu"))
    assert all(p.requires_grad for p in full.backbone.parameters())


@pytest.mark.parametrize("change, message", [
    ({"process": None}, "task: process_monitoring goes with a `process` section"),
    ({"process": {"skpm_log": "BPI12"}}, "process.skpm_log replaces data.train_file / data.generator"),
    ({"data": {}}, "give exactly one of data.train_file or data.generator"),
    ({"process": {"backbone": "transformer"}}, "process.backbone"),
])
def test_recipe_checks_for_process_monitoring(tmp_path, change, message):
    from multitune.recipes.loader import validate_recipe

    raw = {"task": "process_monitoring", "output_dir": str(tmp_path), "model": {"name_or_path": "lstm"},
           "process": {"backbone": "lstm"}, "data": {"generator": {"n_train": 10}}}
    raw.update(change)
    with pytest.raises(InputError, match=message.replace("(", "\\(")):
        validate_recipe({k: v for k, v in raw.items() if v is not None})
    empty = write(tmp_path, "", "empty.csv")
    from multitune.data_prep.tasks.process_monitoring.eventlog import read_event_log

    with pytest.raises(InputError, match="not a readable CSV"):
        read_event_log(empty, COLUMNS)


def test_lora_on_chosen_layers_of_the_backbone_round_trips(tiny_model_dir, tmp_path):
    """`adapter.layers_to_transform` on the bare backbone (module names `layers.N.`, no `model.` prefix): LoRA lands
    in exactly the chosen layer, and the saved adapter loads back onto the base with the same predictions."""
    from multitune.recipes.schema import AdapterConfig
    from multitune.trainer.process_monitoring import EventBatch, predict
    from multitune.trainer.sequence_model import build_sequence_model, load_sequence_model, save_sequence_model

    spec = _spec("causal_lm", tiny_model_dir)
    spec["adapter"] = AdapterConfig(kind="lora", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                                    layers_to_transform=[1]).model_dump()
    torch.manual_seed(2)
    model = build_sequence_model(spec, torch.device("cpu"))
    lora_layers = {name.split("layers.")[1].split(".")[0] for name, _ in model.named_parameters() if "lora_" in name}
    assert lora_layers == {"1"}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_sequence_model(model, weights, spec, tmp_path / "adapter")
    loaded, _ = load_sequence_model(tmp_path / "adapter", torch.device("cpu"))
    n = 5
    batch = EventBatch(torch.randint(2, 8, (1, n, 3)), torch.randn(1, n, 5), torch.arange(n)[None],
                       torch.zeros(1, n, dtype=torch.long), torch.zeros(1, n, dtype=torch.long), torch.zeros(1, n),
                       torch.full((1, n), -1), n, n)
    with torch.no_grad():
        assert torch.equal(predict(model.eval(), batch, torch.float32)[0], predict(loaded, batch, torch.float32)[0])
