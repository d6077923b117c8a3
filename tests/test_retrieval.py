"""Retrieval-augmented medical QA evaluation: passages from a generated document folder, the local MiniLM embedder
finds the passage that answers each question, and `eval --retrieval-docs` adds `+rag` columns."""

from __future__ import annotations

import json

import pytest
from conftest import recipe_dict, write_recipe


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    from multitune.data_prep.tasks.medical_qa.generator import reference_passages

    folder = tmp_path_factory.mktemp("docs")
    for kind, passages in reference_passages().items():
        (folder / f"{kind}.md").write_text("\n\n".join(passages) + "\n")
    (folder / "unrelated.txt").write_text("The cafeteria opens at eight.\n\nParking permits renew every January.\n")
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4 ignored")
    return folder


@pytest.fixture(scope="module")
def retriever(docs):
    from multitune.trainer.retrieval import Retriever, load_passages

    return Retriever(load_passages(docs))


def test_passages_are_paragraphs_of_text_files(docs, tmp_path):
    from multitune.recipes.errors import InputError
    from multitune.trainer.retrieval import load_passages

    passages = load_passages(docs)
    assert passages[0].source == "deficiency.md#1" and passages[0].text.startswith("Scurvy.")
    assert [p.source for p in passages][-2:] == ["unrelated.txt#1", "unrelated.txt#2"]
    with pytest.raises(InputError, match="no passages"):
        load_passages(tmp_path)
    with pytest.raises(InputError, match="folder not found"):
        load_passages(tmp_path / "missing")


def test_retrieval_returns_the_passage_that_answers_each_question(retriever):
    from multitune.data_prep.tasks.medical_qa.generator import generate_items

    items = generate_items(40, seed=5)
    top = retriever.search([item["question"] for item in items], k=1)
    for item, (passage,) in zip(items, top):
        answer = item["options"]["ABCDE".index(item["answer_letter"])]
        assert answer.lower() in passage.text.lower(), (item["question"], passage.text)
    augmented = retriever.augment(items[:2], k=3)
    assert len(augmented[0]["context"]) == 3 and "context" not in items[0]


def test_eval_with_retrieval_adds_rag_columns(retriever, tiny_model_dir, tmp_path):
    from multitune.data_prep.tasks import get_task
    from multitune.recipes.errors import InputError
    from multitune.recipes.loader import load_recipe
    from multitune.trainer.evaluate import evaluate_recipe

    path = write_recipe(tmp_path / "recipe.yaml", recipe_dict(
        tmp_path, tiny_model_dir, task="medical_mcq", data={"generator": {"n_train": 8, "n_eval": 3, "seed": 2}},
        eval={"max_samples": 3, "max_new_tokens": 4, "batch_size": 3}))
    results, table = evaluate_recipe(load_recipe(path), [], retriever=retriever, top_k=2)
    assert list(results) == ["base", "base+rag"]
    assert {"accuracy_loglik", "accuracy_generation", "answer_rate"} <= set(results["base+rag"])
    assert "answer_nll" not in results["base+rag"] and "| accuracy_loglik" in table
    rag = json.loads((tmp_path / "run" / "eval" / "base+rag.json").read_text())
    record = rag["examples"][0]["record"]
    assert len(record["context"]) == 2 and rag["retrieval_top_k"] == 2
    prompt = get_task("medical_mcq").format(record).messages[-1]["content"]
    assert prompt.startswith("Reference passages:\n[1] ") and prompt.endswith(record["options"][-1])

    with pytest.raises(InputError, match="does not show retrieved passages"):
        evaluate_recipe(load_recipe(path, ["task=ticket_classification"]), [], retriever=retriever)
