"""Where a recipe's generation eval spends its time: greedy answers (prefill + decode) and answer_nll, timed apart.

`python -m bench.eval_speed RECIPE [--adapter DIR] [key=value ...]` prints one JSON line; BENCHMARKS.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    from multitune.data_prep.prepare import prepare
    from multitune.data_prep.shards import ShardedDataset
    from multitune.data_prep.tasks import task_for
    from multitune.recipes.loader import load_recipe
    from multitune.trainer.evaluate import answer_nll, eval_records, generate_answers, load_for_eval

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--adapter")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    task = task_for(recipe)
    started = time.perf_counter()
    model, tokenizer, device = load_for_eval(recipe, Path(args.adapter) if args.adapter else None)
    eval_set = ShardedDataset(prepare(task, recipe.data, tokenizer).split("eval"))
    load_s = time.perf_counter() - started
    records = eval_records(eval_set, recipe.eval)
    prompts = [eval_set.tokens(i)[: eval_set.prompt_length(i)].tolist() for i in range(len(records))]
    started = time.perf_counter()
    outputs = generate_answers(model, tokenizer, prompts, recipe.eval.max_new_tokens, recipe.eval.batch_size, device)
    generate_s = time.perf_counter() - started
    started = time.perf_counter()
    nll = answer_nll(model, eval_set, len(records), device)
    nll_s = time.perf_counter() - started
    metrics = task.score(outputs, records)
    print(json.dumps({"samples": len(records), "prompt_tokens": sum(map(len, prompts)), "load_s": round(load_s, 2),
                      "generate_s": round(generate_s, 2), "answer_nll_s": round(nll_s, 2), "answer_nll": nll,
                      "threads": torch.get_num_threads(), **metrics}))


if __name__ == "__main__":
    main()
