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
def recipe(tiny_model_dir, tmp_path_factory):
    from conftest import recipe_dict

    tmp = tmp_path_factory.mktemp("eval")
    return validate_recipe(recipe_dict(tmp, tiny_model_dir, data={"generator": {"n_train": 20, "n_eval": 10,
                                                                                "seed": 3}}))


@pytest.fixture(scope="module")
def eval_set(recipe, tokenizer):
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


def test_eval_split_loss_is_answer_nll_batched_as_training_and_builds_no_graph(model, eval_set, recipe, tokenizer):
    """One teacher-forced loss, two batchings: the loop's packed eval-split loss equals answer_nll over the same
    rows, and it runs without autograd (a graph kept per micro-batch would hold the whole split's activations)."""
    from accelerate import Accelerator

    from multitune.trainer.loop import eval_loss
    from multitune.trainer.workload import TextWorkload

    work = TextWorkload(recipe, task_for(recipe))
    work.tokenizer = tokenizer
    grad_enabled = []
    hook = model.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    try:
        packed = eval_loss(model, eval_set, recipe, Accelerator(cpu=True), work)
    finally:
        hook.remove()
    assert grad_enabled and not any(grad_enabled)
    assert packed == pytest.approx(answer_nll(model, eval_set, len(eval_set), torch.device("cpu")), abs=1e-4)
