"""`multitune infer`: answer a JSONL/CSV of new rows with base + adapter; one output row per input row, always."""

from __future__ import annotations

import json
import os
from pathlib import Path

from recipes.errors import InputError


def run_inference(recipe, adapter: Path | None, input_path: Path, output_path: Path, batch_size: int | None = None,
                  max_new_tokens: int | None = None) -> dict[str, int]:
    """Write `{"row", "input", "output", "valid", ...parsed}` per input row, in input order; invalid outputs are
    flagged (`valid: false` plus `problems`), never dropped. Returns counts of rows and valid rows."""
    from data_prep.chat_encoding import chat_encoder
    from data_prep.tasks import task_for
    from trainer.evaluate import generate_answers, load_for_eval

    task = task_for(recipe)
    if not task.input_fields:
        raise InputError(f"task {task.name} does not declare the input fields `multitune infer` needs")
    rows = list(task.read(input_path, inputs_only=True))  # validated before any model is loaded
    if not rows:
        raise InputError(f"--input {input_path}: no rows")
    if output_path.is_dir():
        raise InputError(f"--output {output_path}: is a folder; give the path of a .jsonl file to write")
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise InputError(f"--output {output_path}: would overwrite the input file")
    model, tokenizer, device = load_for_eval(recipe, adapter)
    prompts = chat_encoder(tokenizer).encode_prompts([task.prompt_messages(row) for row in rows])
    outputs = generate_answers(model, tokenizer, prompts, max_new_tokens or recipe.eval.max_new_tokens,
                               batch_size or recipe.eval.batch_size, device)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f".{output_path.name}.tmp")
    valid = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for index, (row, text) in enumerate(zip(rows, outputs)):
            parsed = task.parse_output(text)
            valid += bool(parsed["valid"])
            handle.write(json.dumps({"row": index, "input": row, "output": text, **parsed}) + "\n")
    os.replace(tmp, output_path)
    return {"rows": len(rows), "valid": valid, "invalid": len(rows) - valid}
