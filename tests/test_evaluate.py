"""The generation eval's batching (sorted by length, shared-prefix KV cache, LM head only at answer positions)
computes what one prompt at a time, unpadded, computes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from multitune.data_prep.prepare import prepare
from multitune.data_prep.shards import ShardedDataset
from multitune.data_prep.tasks import task_for
from multitune.recipes.loader import validate_recipe
from multitune.trainer.evaluate import answer_nll, common_prefix_length, generate_answers


@pytest.fixture(scope="module")
def eval_set(tiny_model_dir, tokenizer, tmp_path_factory):
    from conftest import recipe_dict

    tmp = tmp_path_factory.mktemp("eval")
    recipe = validate_recipe(recipe_dict(tmp, tiny_model_dir, data={"generator": {"n_train": 20, "n_eval": 10,
                                                                                  "seed": 3}}))
    return ShardedDataset(prepare(task_for(recipe), recipe.data, tokenizer).split("eval"))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]], keep=1) == 2
    assert common_prefix_length([[7, 2], [1, 2]]) == 0


def test_batched_answers_equal_one_prompt_at_a_time(model, tokenizer, eval_set):
    prompts = [eval_set.tokens(i)[: eval_set.prompt_length(i)].tolist() for i in range(len(eval_set))]
    prompts[3] = prompts[3][:40]  # lengths that differ a lot, and a shared prefix of the system prompt only
    assert common_prefix_length(prompts) > 20
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=12, batch_size=4, device=torch.device("cpu"))
    for prompt, answer in zip(prompts, batched):
        alone = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        assert answer == tokenizer.decode(alone[0, len(prompt):], skip_special_tokens=True).strip()


def test_batched_answer_nll_equals_one_row_at_a_time(model, eval_set):
    total, count = 0.0, 0
    for i in range(len(eval_set)):
        ids = torch.tensor(eval_set.tokens(i), dtype=torch.long)[None]
        labels = torch.tensor(eval_set.tokens(i, "labels"), dtype=torch.long)[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                                                   reduction="sum").item()
        count += int((labels[:, 1:] != -100).sum())
    for batch_size in (1, 3, 16):
        assert answer_nll(model, eval_set, len(eval_set), torch.device("cpu"), batch_size) \
            == pytest.approx(total / count, abs=1e-4)
