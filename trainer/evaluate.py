"""Generation evaluation on the held-out split: greedy answers to each prompt, scored by the task's own metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from peft import PeftModel

from data_prep.prepare import prepare
from data_prep.shards import ShardedDataset
from data_prep.tasks import Task, get_task
from recipes.errors import InputError
from recipes.schema import AdapterConfig, EvalConfig, Recipe
from trainer.model import load_model, load_tokenizer
from trainer.run_files import write_atomic


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                     device: torch.device) -> list[str]:
    """Greedy completions for tokenized prompts, left-padded in batches; special tokens stripped."""
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, prompt in enumerate(chunk):
                ids[row, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.long)
                mask[row, width - len(prompt):] = 1
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
            )
            outputs += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return [text.strip() for text in outputs]


def evaluate_generation(model, tokenizer, dataset: ShardedDataset, task: Task, config: EvalConfig,
                        device: torch.device) -> tuple[dict[str, float], list[dict]]:
    """Task metrics plus timing; also returns (prompt record, output) examples for inspection."""
    count = len(dataset) if config.max_samples is None else min(config.max_samples, len(dataset))
    prompts = [dataset.tokens(i)[: dataset.prompt_length(i)].tolist() for i in range(count)]
    records = [json.loads(dataset.record_json(i)) for i in range(count)]
    started = time.perf_counter()
    outputs = generate_answers(model, tokenizer, prompts, config.max_new_tokens, config.batch_size, device)
    metrics = task.score(outputs, records)
    metrics["samples"] = count
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    examples = [{"record": r, "output": o} for r, o in zip(records[:5], outputs[:5])]
    return metrics, examples


def evaluate_recipe(recipe: Recipe, adapter: Path | None) -> dict:
    """`multitune eval`: the recipe's base model (as the recipe loads it), optionally with an adapter."""
    task = get_task(recipe.task)
    tokenizer = load_tokenizer(recipe.model)
    eval_set = ShardedDataset(prepare(task, recipe.data, tokenizer).split("eval"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(recipe.model, AdapterConfig(kind="none"), device, gradient_checkpointing=False)
    if adapter is not None:
        if not (adapter / "adapter_config.json").is_file():
            raise InputError(f"--adapter {adapter}: not an adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, str(adapter))
    metrics, _ = evaluate_generation(model, tokenizer, eval_set, task, recipe.eval, device)
    label = adapter.name if adapter is not None else "base"
    out = recipe.output_path / "eval" / f"{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps({"model": recipe.model.name_or_path, "adapter": str(adapter) if adapter else None,
                                  **metrics}, indent=2))
    return metrics
