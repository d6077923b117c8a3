"""A team's own export end to end: its labels, language, column names and file dialects; per-class reports; the
same prompt in prep, eval, infer and serve."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import recipe_dict
from own_data import COLUMNS, excel_csv, german_tickets

from multitune.data_prep.prepare import prepare
from multitune.data_prep.readers import read_rows
from multitune.data_prep.shards import ShardedDataset
from multitune.data_prep.tasks import get_task, task_for
from multitune.data_prep.tasks.json_metrics import class_report
from multitune.data_prep.tokenize import IGNORE
from multitune.recipes.errors import InputError
from multitune.recipes.loader import validate_recipe
from multitune.recipes.schema import DataConfig, TaskOptions

FIELDS = ["title", "description", "category", "subcategory", "urgency"]
TICKET = get_task("ticket_classification")


def german_recipe(tmp_path, model_dir, rows: int = 60, **data):
    path = tmp_path / "export.csv"
    path.write_bytes(excel_csv(german_tickets(rows), FIELDS))
    return validate_recipe(recipe_dict(tmp_path, model_dir, data={
        "generator": None, "train_file": str(path), "eval_fraction": 0.2, "columns": COLUMNS, **data}))


# --- readers ----------------------------------------------------------------------------------------------------

def test_an_excel_csv_reads_as_written(tmp_path):
    rows = german_tickets(17)
    path = tmp_path / "export.csv"
    path.write_bytes(excel_csv(rows, FIELDS))
    assert path.read_bytes().startswith(b"\xef\xbb\xbf") and b"\r\n" in path.read_bytes()
    read = [record for _, record in read_rows(path, COLUMNS)]
    assert [{f: r[f] for f in FIELDS} for r in read] == rows  # the BOM is not part of the first column's name
    assert "Dockingstation anschließe.\nOhne Dock" in read[3]["description"]  # the quoted line break survives
    assert read[0]["Betreff"] == rows[0]["title"]  # the team's own column names stay on the record too


@pytest.mark.parametrize("delimiter", [",", "\t"])
def test_comma_and_tab_separated_exports_are_sniffed(tmp_path, delimiter):
    rows = german_tickets(5)
    path = tmp_path / "export.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    assert [r for _, r in read_rows(path)] == rows


def test_an_ambiguous_separator_is_one_line_naming_the_setting(tmp_path):
    path = tmp_path / "odd.csv"
    path.write_text("a;b,c;d\n1;2,3;4\n")  # `;` gives 3 columns on every line, `,` gives 2
    with pytest.raises(InputError, match=r"odd.csv: ambiguous CSV separator: both ',' and ';' .*data.csv_delimiter"):
        list(read_rows(path))
    assert [r for _, r in read_rows(path, delimiter=";")] == [{"a": "1", "b,c": "2,3", "d": "4"}]


def test_json_array_bom_jsonl_parquet_and_instruction_rows_give_the_same_records(tmp_path):
    rows = german_tickets(4)
    array = tmp_path / "tickets.json"
    array.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    bom = tmp_path / "tickets.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    parquet = tmp_path / "tickets.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    instructions = tmp_path / "instructions.jsonl"
    instructions.write_text("".join(json.dumps({
        "instruction": "Klassifiziere das Ticket.",
        "input": {"title": r["title"], "description": r["description"]},
        "output": json.dumps({f: r[f] for f in ("category", "subcategory", "urgency")}) if i % 2 else
        {f: r[f] for f in ("category", "subcategory", "urgency")}}) + "\n" for i, r in enumerate(rows)))
    for path in (array, bom, parquet, instructions):
        assert [{f: r[f] for f in FIELDS} for r in TICKET.read(path)] == rows, path.name


def test_mapped_columns_are_named_in_errors(tmp_path):
    rows = german_tickets(3)
    rows[1]["description"] = " "
    path = tmp_path / "export.csv"
    path.write_bytes(excel_csv(rows, FIELDS))
    with pytest.raises(InputError, match=r"export.csv:3: missing field 'description' \(column 'Beschreibung'\)"):
        list(TICKET.read(path, columns=COLUMNS))
    with pytest.raises(InputError, match=r"data.columns.description: column 'Text' is not in .*export.csv \(its "
                                         r"columns: Betreff, Beschreibung, Kategorie"):
        list(TICKET.read(path, columns={**COLUMNS, "description": "Text"}))


# --- labels --------------------------------------------------------------------------------------------------------

def test_labels_are_collected_from_the_training_split_and_recorded(tmp_path, tiny_model_dir, tokenizer):
    recipe = german_recipe(tmp_path, tiny_model_dir)
    prepared = prepare(task_for(recipe), recipe.data, tokenizer)
    labels = prepared.labels
    assert labels["urgency"] == ["Hoch", "Mittel", "Niedrig"]
    assert list(labels["category"]) == ["Hardware", "Rechnung", "Software", "Zugang & Konten"]
    assert sum("Feedback und Vorschläge" in subs for subs in labels["category"].values()) == 3
    assert prepared.manifest["labels"] == labels and prepared.manifest["splits"]["eval"]["rows"] > 0
    task = task_for(recipe).with_labels(labels)
    assert "Zugang & Konten (Berechtigungen, Passwort)" in task.system_prompt()

    # The labelled span of every eval row decodes to the labels verbatim (no \u escapes) and its end-of-turn.
    dataset = ShardedDataset(prepared.split("eval"))
    for i in range(len(dataset)):
        record = json.loads(dataset.record_json(i))
        ids, targets = np.asarray(dataset.tokens(i)), np.asarray(dataset.tokens(i, "labels"))
        answer = tokenizer.decode(ids[targets != IGNORE], skip_special_tokens=True).strip()
        assert answer == json.dumps({f: record[f] for f in ("category", "subcategory", "urgency")},
                                    ensure_ascii=False)
        assert "\\u" not in answer


def test_a_declared_taxonomy_refuses_rows_outside_it_and_unseen_eval_labels_warn(tmp_path, tokenizer, caplog):
    rows = german_tickets(20)
    train, held_out = tmp_path / "train.csv", tmp_path / "eval.csv"
    train.write_bytes(excel_csv(rows, FIELDS))
    held_out.write_bytes(excel_csv([{**rows[0], "category": "Telefonie", "subcategory": "Headset"},
                                    {**rows[1], "urgency": "Sofort"}, rows[2]], FIELDS))
    data = DataConfig(train_file=str(train), eval_file=str(held_out), columns=COLUMNS, cache_dir=str(tmp_path / "c"))
    with caplog.at_level(logging.WARNING):
        prepared = prepare(TICKET, data, tokenizer)
    assert prepared.manifest["unseen_labels"] == {"category": {"Telefonie": 1}, "urgency": {"Sofort": 1}}
    assert "2 eval rows have labels never seen in training" in caplog.text
    assert "category 'Telefonie' (1)" in caplog.text

    collected = prepared.labels
    declared = TICKET.with_options(TaskOptions(labels=collected))
    with pytest.raises(InputError, match=r"eval.csv:2: field 'category' \(column 'Kategorie'\) must be one of "
                                         r"Hardware\|Rechnung\|Software\|Zugang & Konten \(got 'Telefonie'\)"):
        prepare(declared, data.model_copy(update={"cache_dir": str(tmp_path / "d")}), tokenizer)


def test_a_few_dozen_rows_always_hold_out_an_eval_row(tmp_path, tokenizer):
    path = tmp_path / "small.csv"
    path.write_bytes(excel_csv(german_tickets(12), FIELDS))
    data = DataConfig(train_file=str(path), columns=COLUMNS, eval_fraction=0.01, cache_dir=str(tmp_path / "c"))
    splits = prepare(TICKET, data, tokenizer).manifest["splits"]
    assert splits["eval"]["rows"] == 1 and splits["train"]["rows"] == 11
    path.write_bytes(excel_csv(german_tickets(1), FIELDS))
    with pytest.raises(InputError, match=r"the train split is empty: .*small.csv has too few rows to hold out "
                                         r"data.eval_fraction=0.01"):
        prepare(TICKET, data.model_copy(update={"cache_dir": str(tmp_path / "d")}), tokenizer)


def test_extraction_takes_the_teams_fields_and_scores_closed_and_free_fields(tmp_path, tokenizer):
    task = get_task("it_ticket_extraction").with_options(TaskOptions(fields=["queue", "host"]))
    rows = [{"description": f"Server srv-{i:03d} antwortet nicht.", "queue": ["Netz", "Server"][i % 2],
             "host": f"srv-{i:03d}"} for i in range(40)]
    path = tmp_path / "incidents.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = prepare(task, DataConfig(train_file=str(path), cache_dir=str(tmp_path / "c")), tokenizer)
    assert prepared.labels["closed_fields"] == ["queue"] and prepared.labels["values"]["queue"] == ["Netz", "Server"]
    task = task.with_labels(prepared.labels)
    outputs = ['{"queue": "Netz", "host": "SRV-000"}', '{"queue": "Netz", "host": "srv-001"}']
    metrics = task.score(outputs, rows[:2])
    assert metrics["queue"] == 0.5 and metrics["queue_f1"] == pytest.approx((2 / 3 + 0) / 2)
    assert metrics["host"] == 1.0 and metrics["host_exact"] == 0.5  # normalised vs verbatim match
    assert "host" not in task.class_reports(outputs, rows[:2])


# --- per-class report ------------------------------------------------------------------------------------------------

def test_class_report_matches_a_hand_computed_example():
    references = ["Hoch", "Hoch", "Mittel", "Niedrig", "Niedrig", "Niedrig"]
    predictions = ["Hoch", "mittel", "Mittel", "Niedrig", None, "Hoch"]
    report = class_report("urgency", predictions, references)
    assert report.classes == ["Hoch", "Mittel", "Niedrig"]
    # Hoch: tp 1, fp 1 (a Niedrig row), fn 1 (a Mittel prediction); Mittel: tp 1, fp 1; Niedrig: tp 1, fn 2.
    assert report.precision == pytest.approx([0.5, 0.5, 1.0])
    assert report.recall == pytest.approx([0.5, 1.0, 1 / 3])
    assert report.f1 == pytest.approx([0.5, 2 / 3, 0.5])
    assert report.support == [2, 1, 3]
    assert report.confusion == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 1, 1]]  # last column: no answer
    assert report.accuracy == pytest.approx(3 / 6) and report.macro_f1 == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)


# --- end to end ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_german_excel_export_trains_evaluates_infers_and_serves_with_one_prompt(tmp_path, tiny_model_dir,
                                                                                   tokenizer, capsys):
    from multitune.launch.chat_model import load_chat_model
    from multitune.launch.infer import prompt_ids, run_inference
    from multitune.trainer.evaluate import evaluate_recipe
    from multitune.trainer.loop import train

    recipe = german_recipe(tmp_path, tiny_model_dir, rows=60, max_seq_len=512)
    recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"max_steps": 2}),
                                       "eval": recipe.eval.model_copy(update={"before_training": True}),
                                       "model": recipe.model.model_copy(update={"quantization": "nf4"})})
    metrics = train(recipe)
    printed = capsys.readouterr().out
    assert "answer_nll" in printed  # the end-of-run table shows the loss that moves first
    # max_new_tokens 8 cuts every ticket answer: the warning from the start of the run is repeated under the scores
    cut = "eval.max_new_tokens=8 is shorter than"
    assert len(metrics["notes"]) == 1 and metrics["notes"][0].startswith(cut) and f"note: {cut}" in printed
    card = (recipe.output_path / "adapter" / "README.md").read_text(encoding="utf-8")
    assert f"note: {metrics['notes'][0]}" in card and "answer_nll" in card
    assert str(recipe.output_path) not in card.split("## Load it")[0]  # no folders of this machine in the scores
    run = recipe.output_path
    for when in ("before", "after"):
        for field in ("category", "subcategory", "urgency"):
            for suffix in ("_report.csv", "_confusion.csv", "_confusion.png"):
                assert (run / "per_class" / f"{when}_{field}{suffix}").is_file()
    assert metrics["per_class"] == str(run / "per_class") and "category_f1" in metrics["after"]
    with open(run / "per_class" / "after_category_report.csv", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    assert table[0] == ["class", "precision", "recall", "f1", "support"]
    assert [row[0] for row in table[1:5]] == ["Hardware", "Rechnung", "Software", "Zugang & Konten"]
    info = json.loads((run / "adapter" / "multitune.json").read_text())
    assert info["labels"]["urgency"] == ["Hoch", "Mittel", "Niedrig"]

    # New tickets to answer: the team's columns, no labels.
    new = tmp_path / "neu.csv"
    new.write_bytes(excel_csv(german_tickets(20)[17:], ["title", "description"]))
    out = tmp_path / "out.jsonl"
    counts = run_inference(recipe, run / "adapter", new, out, max_new_tokens=8)
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert counts["rows"] == len(written) == 3 and all("valid" in w and "problems" in w for w in written)
    assert "Öztürk" not in out.read_text(encoding="utf-8") or "\\u00d6" not in out.read_text(encoding="utf-8")

    # One prompt everywhere: the eval shard's prompt ids = infer's = serve's (user turn only; the adapter's system
    # prompt is the default).
    dataset = ShardedDataset(next(p for p in (tmp_path / "cache").iterdir() if p.is_dir()) / "eval")
    record = json.loads(dataset.record_json(0))
    trained = dataset.tokens(0)[: dataset.prompt_length(0)].tolist()
    task = task_for(recipe).with_labels(info["labels"])
    assert prompt_ids(task, tokenizer, [record]) == [trained]
    chat = load_chat_model(str(tiny_model_dir), run / "adapter", "float32", None)
    assert chat.prompt_ids([task.prompt_messages(record)[-1]]) == trained
    import bitsandbytes as bnb  # a QLoRA adapter is served on the NF4 base it was trained against, unasked

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in chat.model.modules())

    results, table = evaluate_recipe(recipe, [run / "adapter"])
    assert list(results) == ["base", "run"] and "category_f1" in results["run"]
    assert table.endswith(f"note: {metrics['notes'][0]}")  # multitune eval's table says why its scores are 0
    assert (run / "eval" / "per_class" / "run_urgency_confusion.csv").is_file()
    assert (run / "eval" / "per_class" / "base_urgency_report.csv").is_file()


def test_chat_jsonl_rows_are_answered_by_infer_one_line_each(tmp_path, tiny_model_dir):
    from multitune.launch.infer import run_inference

    recipe = validate_recipe(recipe_dict(tmp_path, tiny_model_dir, task="chat_jsonl", data={
        "generator": {"n_train": 20, "n_eval": 4, "seed": 0},
        "task_options": {"json_fields": ["product", "quantity", "city"], "system_prompt": "Antworte mit JSON."}}))
    new = tmp_path / "neu.jsonl"
    rows = [{"prompt": "Bitte 3 Headsets nach Graz schicken."}, {"messages": [{"role": "user", "content": "2 Docks"}]}]
    new.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    counts = run_inference(recipe, None, new, out, max_new_tokens=4)
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert counts["rows"] == 2 and [w["input"] for w in written] == rows
    assert all(w["valid"] is False and w["problems"] for w in written)  # 4 tokens of a random model: flagged


def test_prep_warns_when_max_new_tokens_cannot_hold_the_answers(tmp_path, tokenizer, caplog):
    from multitune.recipes.schema import EvalConfig
    from multitune.trainer.evaluate import warn_if_answers_exceed

    path = tmp_path / "export.csv"
    path.write_bytes(excel_csv(german_tickets(30), FIELDS))
    prepared = prepare(TICKET, DataConfig(train_file=str(path), columns=COLUMNS, eval_fraction=0.3,
                                          cache_dir=str(tmp_path / "c")), tokenizer)
    dataset = ShardedDataset(prepared.split("eval"))
    longest = max(int(dataset.lengths[i]) - dataset.prompt_length(i) for i in range(len(dataset)))
    with caplog.at_level(logging.WARNING):
        assert warn_if_answers_exceed(dataset, EvalConfig(max_new_tokens=longest)) is None
        assert not [r for r in caplog.records if r.name.startswith("multitune")]  # (a library may warn on import)
        message = warn_if_answers_exceed(dataset, EvalConfig(max_new_tokens=longest - 1))
    assert f"eval.max_new_tokens={longest - 1} is shorter than" in message and f"longest {longest}" in message
    assert message in caplog.text  # logged, and returned for the end-of-run table


@pytest.mark.parametrize("max_new_tokens", [8, 400])
def test_validate_says_when_max_new_tokens_cannot_hold_its_example_answer(tmp_path, tiny_model_dir, capsys,
                                                                           max_new_tokens):
    from conftest import write_recipe

    from multitune.launch.cli import main

    recipe = recipe_dict(tmp_path, tiny_model_dir, eval={"max_new_tokens": max_new_tokens})
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
    rendered = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("chat template:"))
    answer = int(rendered.split(" prompt + ")[1].split()[0])  # a ticket's JSON answer: tens of tokens
    warned = f"warning: eval.max_new_tokens={max_new_tokens} is shorter than this answer" in rendered
    assert warned == (answer > max_new_tokens) and answer > 8
