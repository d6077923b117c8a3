"""`multitune infer`: answer a JSONL/CSV of new rows with base + adapter; one output row per input row, always."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from multitune.atomic import atomic_file
from multitune.recipes.errors import InputError

log = logging.getLogger(__name__)


def run_inference(recipe, adapter: Path | None, input_path: Path, output_path: Path, batch_size: int | None = None,
                  max_new_tokens: int | None = None) -> dict[str, int]:
    """Write `{"row", "input", "output", "valid", ...parsed}` per input row, in input order; invalid outputs are
    flagged (`valid: false` plus `problems`), never dropped. Prompts are built as in training: the task's label sets
    come from the adapter folder (or, for the base model, from the recipe's prepared data), the input file is read
    through `data.columns`. Returns counts of rows and valid rows."""
    from multitune.data_prep.prepare import count_unseen, describe_unseen, prepare
    from multitune.data_prep.tasks import task_for
    from multitune.trainer.evaluate import generate_answers, load_for_eval
    from multitune.trainer.merge import adapter_info
    from multitune.trainer.model import load_tokenizer

    task = task_for(recipe)
    data = recipe.data
    rows = list(task.read(input_path, inputs_only=True, columns=data.columns, delimiter=data.csv_delimiter))
    if output_path.is_dir():
        raise InputError(f"--output {output_path}: is a folder; give the path of a .jsonl file to write")
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise InputError(f"--output {output_path}: would overwrite the input file")
    labels = adapter_info(adapter).get("labels") if adapter is not None else None
    if labels is None and task.needs_labels():
        labels = prepare(task, data, load_tokenizer(recipe.model)).labels
    task = task.with_labels(labels)
    unseen: dict[str, dict[str, int]] = {}
    for row in rows:
        count_unseen(task, row, unseen)
    if unseen:
        log.warning("--input %s: %s", input_path, describe_unseen(unseen, "rows", "the model can only answer with "
                                                                             "trained labels"))
    model, tokenizer, device = load_for_eval(recipe, adapter)
    prompts = prompt_ids(task, tokenizer, rows)
    outputs = generate_answers(model, tokenizer, prompts, max_new_tokens or recipe.eval.max_new_tokens,
                               batch_size or recipe.eval.batch_size, device)
    valid = 0
    with atomic_file(output_path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for index, (row, text) in enumerate(zip(rows, outputs)):
            parsed = task.parse_output(text)
            valid += bool(parsed["valid"])
            handle.write(json.dumps({"row": index, "input": row, "output": text, **parsed}, ensure_ascii=False,
                                    default=str) + "\n")
    return {"rows": len(rows), "valid": valid, "invalid": len(rows) - valid}


def prompt_ids(task, tokenizer, rows: list[dict]) -> list[list[int]]:
    """Token ids of each row's prompt through the chat template, ending with the generation prompt: the ids training
    masked as prompt for a labelled row."""
    from multitune.data_prep.chat_encoding import chat_encoder

    return chat_encoder(tokenizer).encode_prompts([task.prompt_messages(row) for row in rows])
