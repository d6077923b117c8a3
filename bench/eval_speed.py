"""Where a recipe's generation eval spends its time: greedy answers (prefill + decode, timed apart) and answer_nll,
and (`--plain`) the same prompts through a plain batched `transformers` `generate` (left padding, input order, the
same stop rule), the baseline `generate_answers` is measured against.

`python -m bench.eval_speed RECIPE [--adapter DIR] [--plain] [key=value ...]` prints one JSON line; BENCHMARKS.md
quotes it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


@torch.no_grad()
def plain_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                   device: torch.device, stop_ids: list[int]) -> list[str]:
    """Greedy completions the way a plain `transformers` script batches them: prompts in input order, left-padded,
    one `generate` call per batch stopping at `stop_ids`; each cut at its first stop token, special tokens stripped."""
    from multitune.trainer.evaluate import until_stop

    model.eval()
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt in enumerate(chunk):
            ids[row, width - len(prompt):] = torch.as_tensor(prompt)
            mask[row, width - len(prompt):] = 1
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids, use_cache=True)
        rows = [until_stop(row, stop_ids) for row in generated[:, width:].tolist()]
        outputs += [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]
    return outputs


def timed(generate, *args) -> tuple[list[str], float]:
    """(generate(*args), its wall seconds)."""
    started = time.perf_counter()
    texts = generate(*args)
    return texts, time.perf_counter() - started


def new_tokens(tokenizer, texts: list[str]) -> int:
    """Tokens the answers are made of, plus one stop token each: the same count for both generators' texts."""
    return sum(len(tokenizer.encode(text, add_special_tokens=False)) + 1 for text in texts)


def main() -> None:
    from multitune.data_prep.chat_encoding import stop_token_ids
    from multitune.data_prep.prepare import prepare
    from multitune.data_prep.shards import ShardedDataset
    from multitune.data_prep.tasks import task_for
    from multitune.recipes.loader import load_recipe
    from multitune.trainer.evaluate import answer_nll, eval_records, generate_answers, load_for_eval

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--adapter")
    parser.add_argument("--plain", action="store_true", help="also time the plain batched generate baseline")
    args = parser.parse_intermixed_args()
    recipe = load_recipe(args.recipe, args.overrides)
    task = task_for(recipe)
    started = time.perf_counter()
    model, tokenizer, device = load_for_eval(recipe, Path(args.adapter) if args.adapter else None)
    eval_set = ShardedDataset(prepare(task, recipe.data, tokenizer).split("eval"))
    load_s = time.perf_counter() - started
    records = eval_records(eval_set, recipe.eval)
    prompts = [eval_set.tokens(i)[: eval_set.prompt_length(i)].tolist() for i in range(len(records))]
    max_new, batch = recipe.eval.max_new_tokens, recipe.eval.batch_size
    generate_answers(model, tokenizer, prompts[:1], 2, 1, device)  # warm-up: first-call costs out of both timings
    outputs, generate_s = timed(generate_answers, model, tokenizer, prompts, max_new, batch, device)
    result = {"samples": len(records), "prompt_tokens": sum(map(len, prompts)), "batch_size": batch,
              "max_new_tokens": max_new, "load_s": round(load_s, 2), "generate_s": round(generate_s, 3),
              # prefill: to each batch's first new token; the rest of generate_s is decode
              "prefill_s": round(timed(generate_answers, model, tokenizer, prompts, 1, batch, device)[1], 3),
              "new_tokens": new_tokens(tokenizer, outputs)}
    if args.plain:
        stop_ids = stop_token_ids(tokenizer, model.generation_config)
        plain, plain_s = timed(plain_generate, model, tokenizer, prompts, max_new, batch, device, stop_ids)
        result |= {"plain_generate_s": round(plain_s, 3),
                   "plain_prefill_s": round(timed(plain_generate, model, tokenizer, prompts, 1, batch, device,
                                                  stop_ids)[1], 3),
                   "plain_new_tokens": new_tokens(tokenizer, plain),
                   "same_answers": sum(a == b for a, b in zip(outputs, plain)) / len(plain)}
    started = time.perf_counter()
    nll = answer_nll(model, eval_set, len(records), device)
    result |= {"answer_nll_s": round(time.perf_counter() - started, 3), "answer_nll": nll,
               "threads": torch.get_num_threads(), **task.score(outputs, records)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
