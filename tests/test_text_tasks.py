"""The text tasks: formatters, generators, metrics on hand-made cases, user files, inference and the MC log-
likelihood."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from multitune.data_prep.tasks import get_task, task_for
from multitune.data_prep.tasks.json_metrics import macro_f1, schema_problems, score_extraction
from multitune.data_prep.tasks.medical_qa import answer_log_likelihoods, parse_letter
from multitune.data_prep.tasks.text_metrics import bleu, rouge_l
from multitune.data_prep.tokenize import IGNORE, tokenize_examples
from multitune.recipes.errors import InputError
from multitune.recipes.schema import TaskOptions

ORDERS = TaskOptions(json_fields=["product", "quantity", "city"])
TASKS = {
    "it_ticket_extraction": get_task("it_ticket_extraction"),
    "rca_generation": get_task("rca_generation"),
    "medical_qa": get_task("medical_qa"),
    "medical_mcq": get_task("medical_mcq"),
    "chat_jsonl": get_task("chat_jsonl").with_options(ORDERS),
}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_completion_only_labels_decode_to_exactly_the_answer(name, tokenizer):
    task = TASKS[name]
    examples = [task.format(r) for r in task.generate(12, seed=3)]
    batch = tokenize_examples(tokenizer, examples, completion_only=True)
    for ids, labels, prompt_len, example in zip(batch.input_ids, batch.labels, batch.prompt_lengths, examples):
        ids, labels = np.array(ids), np.array(labels)
        assert (labels[:prompt_len] == IGNORE).all() and (labels[prompt_len:] != IGNORE).all()
        assert tokenizer.decode(ids[labels != IGNORE], skip_special_tokens=True).strip() == example.answer
        assert ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("name, min_distinct", [("it_ticket_extraction", 0.95), ("rca_generation", 0.9),
                                                ("medical_qa", 0.4), ("medical_mcq", 0.8), ("chat_jsonl", 0.9)])
def test_generators_are_deterministic_and_varied(name, min_distinct):
    """Medical QA draws from a small fact bank, so its free-text prompts repeat more (as topics do in real QA sets)."""
    task = TASKS[name]
    a = task.generate(300, seed=5)
    assert a == task.generate(300, seed=5) and a != task.generate(300, seed=6)
    prompts = [json.dumps(task.format(r).messages) for r in a]
    assert len(set(prompts)) / len(prompts) >= min_distinct
    answers = [task.format(r).answer for r in a]
    assert len(set(answers)) >= (4 if name == "medical_mcq" else 20)  # MC answers are letters A-D


def test_extraction_generator_covers_every_label():
    records = TASKS["it_ticket_extraction"].generate(600, seed=0)
    assert len({r["category"] for r in records}) == 5 and len({r["assignment_group"] for r in records}) == 8
    assert len({r["priority"] for r in records}) == 5 and len({r["impact"] for r in records}) == 3
    assert all(r["configuration_item"] in r["description"] for r in records)  # extractable from the text


def test_macro_f1_on_a_hand_made_case():
    # classes a, b, c: F1(a) = 2*1/(2+1+1) = 0.5, F1(b) = 2*1/(2+0+1) = 2/3, F1(c) = 0 (predicted once, never true)
    predictions = ["a", "a", "b", "c", None]
    references = ["a", "b", "b", "a", "b"]
    # a: tp=1 fp=1 fn=1 -> 0.5 ; b: tp=1 fp=0 fn=2 -> 0.5 ; c: tp=0 -> 0
    assert macro_f1(predictions, references) == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert macro_f1(["x", "y"], ["x", "y"]) == 1.0


def test_score_extraction_parse_schema_fields_on_hand_made_outputs():
    fields = ("category", "priority")
    refs = [{"category": "network", "priority": "1 - Critical"}, {"category": "software", "priority": "4 - Low"},
            {"category": "network", "priority": "4 - Low"}, {"category": "hardware", "priority": "4 - Low"}]
    outputs = ['{"category": "network", "priority": "1 - Critical"}',          # right, valid
               'Sure! {"category": "Software", "priority": "2 - High"} done',  # parsed, category right
               '{"category": "network"}',                                       # parsed, schema invalid
               '{"category": "hardware", "priority": ']                         # truncated: unparsable
    m = score_extraction(outputs, refs, fields, f1_fields=("category",))
    assert m["parse_rate"] == 0.75 and m["schema_valid"] == 0.5
    assert m["category"] == 0.75 and m["priority"] == 0.25 and m["exact_match"] == 0.25
    assert m["category_f1"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)  # network 2/2, software 1/1, hardware missed
    assert schema_problems({"category": "x", "priority": "", "extra": 1}, fields) == [
        "unexpected key 'extra'", "key 'priority' is not a non-empty string"]


def test_rouge_l_and_bleu_on_hand_made_cases():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert rouge_l(["dog barks"], ["the cat sat"]) == 0.0
    # LCS 5 of 5 predicted and 6 reference words: P=1, R=5/6, F=10/11
    assert rouge_l(["the cat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100 * 10 / 11)
    assert bleu(["the cat sat on the mat today"], ["the cat sat on the mat today"]) == pytest.approx(100.0)
    assert bleu(["completely different words here"], ["the cat sat on the mat today"]) == pytest.approx(0.0)
    # 4 of 4 unigrams, 3/3 bigrams, 2/2 trigrams, 1/1 4-gram match, brevity penalty exp(1 - 6/4)
    assert bleu(["the cat sat on"], ["the cat sat on the mat"]) == pytest.approx(100 * np.exp(1 - 6 / 4), rel=1e-4)


def test_rca_scores_exact_cause_only_where_labelled():
    task = TASKS["rca_generation"]
    records = [{"description": "d", "resolution": "fixed it", "cause": "disk full"},
               {"description": "d", "resolution": "restarted", "cause": "memory leak"},
               {"description": "d", "resolution": "no label here"}]
    outputs = ["Root cause: Disk  Full.\nResolution: fixed it", "Resolution: restarted", "Resolution: no label here"]
    m = task.score(outputs, records)
    assert m["cause_accuracy"] == 0.5  # the unlabelled record does not count
    assert "cause_accuracy" not in task.score(outputs[2:], records[2:])


def test_mcq_letter_parsing_and_generation_accuracy():
    task = TASKS["medical_mcq"]
    assert [parse_letter(t) for t in ["B", "Answer: C.", "(D) naloxone", "I think", "a benzodiazepine"]] == [
        "B", "C", "D", None, None]
    records = [{"question": "q", "options": ["x", "y"], "answer_letter": "A"}] * 2 + [
        {"question": "q", "A": "x", "B": "y", "answer_letter": "B"}]
    assert task.score(["A", "B", "nothing"], records) == {"accuracy_generation": pytest.approx(1 / 3),
                                                          "answer_rate": pytest.approx(2 / 3)}


def test_option_log_likelihood_equals_a_manual_forward(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    task = TASKS["medical_mcq"]
    record = task.generate(1, seed=0)[0]
    messages = task.prompt_messages(record)
    scores = answer_log_likelihoods(model, tokenizer, messages, ["A", "B", "C", "D"], torch.device("cpu"))
    for letter, score in zip("ABCD", scores):
        full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": letter}])["input_ids"]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
        expected = sum(logprobs[i - 1, full[i]].item() for i in range(len(prompt), len(full)))
        assert score.item() == pytest.approx(expected, abs=1e-3)
    # the mask keeps padding out: a shorter candidate scores the same alone as in a batch with longer ones
    alone = answer_log_likelihoods(model, tokenizer, messages, ["A"], torch.device("cpu"))
    assert alone[0].item() == pytest.approx(scores[0].item(), abs=1e-3)


def test_user_files_are_validated_with_file_and_line(tmp_path):
    chat = TASKS["chat_jsonl"]
    good = {"messages": [{"role": "user", "content": "Order 2 webcams to Graz"},
                         {"role": "assistant", "content": '{"product": "webcam", "quantity": 2, "city": "Graz"}'}]}
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "p", "completion": '{"product": "x"}'}) + "\n")
    with pytest.raises(InputError, match=r"mine.jsonl:2: .*missing key 'quantity'"):
        list(chat.read(path))
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(InputError, match=r"mine.jsonl:1: the last message .* assistant"):
        list(chat.read(path))
    assert list(chat.read(path, inputs_only=True))  # new rows to answer need no answer
    mcq = tmp_path / "mcq.csv"
    mcq.write_text("question,A,B,C,answer_letter\nWhich?,x,y,z,B\nWhich?,x,y,z,E\n")
    with pytest.raises(InputError, match=r"mcq.csv:3: field 'answer_letter' must be one of A\|B\|C"):
        list(TASKS["medical_mcq"].read(mcq))
    tickets = tmp_path / "t.jsonl"
    tickets.write_text(json.dumps({"short_description": "VPN down", "description": "x"}) + "\n")
    with pytest.raises(InputError, match=r"t.jsonl:1: missing field 'category'"):
        list(TASKS["it_ticket_extraction"].read(tickets))
    assert list(TASKS["it_ticket_extraction"].read(tickets, inputs_only=True))[0]["short_description"] == "VPN down"


def test_a_task_refuses_options_it_does_not_take(tmp_path, tiny_model_dir):
    from conftest import recipe_dict

    from multitune.recipes.loader import validate_recipe

    recipe = validate_recipe(recipe_dict(tmp_path, tiny_model_dir, task="it_ticket_extraction",
                                         data={"task_options": {"json_fields": ["a"]}}))
    with pytest.raises(InputError, match="data.task_options.json_fields: task it_ticket_extraction does not take "
                                         r"this option \(it takes closed_fields, fields, labels, system_prompt\)"):
        task_for(recipe)
    chat = task_for(validate_recipe(recipe_dict(tmp_path, tiny_model_dir, task="chat_jsonl",
                                                data={"task_options": {"json_fields": ["a"]}})))
    assert chat.options.json_fields == ["a"] and chat.headline_metrics[0] == "parse_rate"
