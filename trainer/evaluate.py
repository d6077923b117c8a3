"""Generation evaluation on the held-out split: greedy answers to each prompt, scored by the task's own metrics."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel

from multitune.atomic import write_atomic
from multitune.data_prep.chat_encoding import chat_encoder, stop_token_ids
from multitune.data_prep.prepare import prepare
from multitune.data_prep.shards import ShardedDataset
from multitune.data_prep.tasks import ChatTask, task_for
from multitune.data_prep.tokenize import IGNORE
from multitune.recipes.errors import InputError
from multitune.recipes.schema import AdapterConfig, EvalConfig, Recipe
from multitune.trainer.adapter_base import check_base
from multitune.trainer.batches import MicroBatch
from multitune.trainer.endpoint import EndpointClient
from multitune.trainer.judge import Judge
from multitune.trainer.lm_loss import token_loss_sum
from multitune.trainer.model import check_adapter_folder, load_model, load_tokenizer
from multitune.trainer.retrieval import Retriever
from multitune.trainer.run_files import write_class_reports

log = logging.getLogger(__name__)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                     device: torch.device) -> list[str]:
    """Greedy completions for tokenized prompts, in input order, each cut at its first stop token (`stop_token_ids`:
    the template's end-of-turn, the generation config's and the tokenizer's eos); special tokens stripped.

    Prompts run in batches of similar length (sorted, so little padding); the tokens every prompt of a batch
    starts with (the system prompt) are prefilled once and their KV cache shared by the batch's rows.
    """
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id
    stop_ids = stop_token_ids(tokenizer, model.generation_config)
    outputs: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            chunk = [prompts[i] for i in rows]
            shared = common_prefix_length(chunk, keep=1)  # each row keeps a token for generate to start from
            width = max(len(p) for p in chunk) - shared
            ids = torch.full((len(chunk), shared + width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), shared + width), dtype=torch.long)
            ids[:, :shared] = torch.as_tensor(chunk[0][:shared], dtype=torch.long)
            mask[:, :shared] = 1
            for row, prompt in enumerate(chunk):  # padded between prefix and rest: positions follow the mask
                ids[row, shared + width - (len(prompt) - shared):] = torch.as_tensor(prompt[shared:], dtype=torch.long)
                mask[row, shared + width - (len(prompt) - shared):] = 1
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad_id, eos_token_id=stop_ids, use_cache=True,
                past_key_values=prefix_cache(model, chunk[0][:shared], len(chunk), device),
            )
            new_tokens = generated[:, shared + width:].tolist()
            texts = tokenizer.batch_decode([until_stop(row, stop_ids) for row in new_tokens], skip_special_tokens=True)
            for i, text in zip(rows, texts):
                outputs[i] = text
    finally:
        model.train(was_training)
    return [text.strip() for text in outputs]


def until_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """Generated ids up to (without) the first stop token: what a finished row generates after it is padding."""
    return next((ids[:k] for k, i in enumerate(ids) if i in stop_ids), ids)


def common_prefix_length(sequences: list[list[int]], keep: int = 0) -> int:
    """Length of the token prefix all `sequences` share, leaving at least `keep` tokens of the shortest one."""
    shortest = min(len(s) for s in sequences) - keep
    first = sequences[0]
    length = 0
    while length < shortest and all(s[length] == first[length] for s in sequences):
        length += 1
    return length


def prefix_cache(model, prefix: list[int], rows: int, device: torch.device):
    """The KV cache of `prefix` (positions 0..len-1), computed once and repeated for `rows` rows; None for an
    empty prefix."""
    if not prefix:
        return None
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([prefix], device=device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(rows)
    return cache


@torch.no_grad()
def answer_nll(model, dataset: ShardedDataset, count: int, device: torch.device, batch_size: int = 16) -> float:
    """Teacher-forced negative log-likelihood per answer token of the reference answers (lower is better): a
    signal for every task even while generations are still unparsable.

    The training loss (`lm_loss.token_loss_sum`) over these rows, batched for eval: rows of similar length
    (right-padded), and the prefix every row of a batch shares (the system prompt) computed once as a KV cache,
    which halves the work on ticket prompts (~95 of ~190 tokens shared).
    """
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    order = sorted(range(count), key=lambda i: len(dataset.tokens(i)))
    try:
        for start in range(0, count, batch_size):
            rows = order[start:start + batch_size]
            seqs = [dataset.tokens(i).tolist() for i in rows]
            labels = [dataset.tokens(i, "labels").tolist() for i in rows]
            # the last prompt token predicts the first answer token: it stays out of the cached prefix
            shared = max(0, min(common_prefix_length(seqs), min(dataset.prompt_length(i) for i in rows) - 1))
            cache = prefix_cache(model, seqs[0][:shared], len(rows), device)
            width = max(len(s) for s in seqs) - shared
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(rows), shared + width), dtype=torch.long)
            mask[:, :shared] = 1
            for row, (seq, label) in enumerate(zip(seqs, labels)):
                ids[row, :len(seq) - shared] = torch.as_tensor(seq[shared:])
                targets[row, :len(seq) - shared - 1] = torch.as_tensor(label[shared + 1:])  # t predicts t+1
                mask[row, shared:len(seq)] = 1
            positions = torch.arange(shared, shared + width)[None].expand(len(rows), -1)
            batch = MicroBatch(input_ids=ids, position_ids=positions, targets=targets,
                               segment_ids=torch.zeros_like(ids), real_tokens=int(mask.sum()),
                               target_tokens=int((targets != IGNORE).sum())).to(device)
            total += token_loss_sum(model, batch, mask.to(device), past_key_values=cache).item()
            tokens += batch.target_tokens
    finally:
        model.train(was_training)
    return round(total / max(tokens, 1), 6)


def warn_if_answers_exceed(dataset: ShardedDataset, config: EvalConfig) -> str | None:
    """One warning line when reference answers (with their end-of-turn) of the evaluated rows are longer than
    `eval.max_new_tokens`: generation stops before they end, so they can never parse or match. Returns the line
    (None when every answer fits), which the end-of-run table repeats next to the scores it explains."""
    count = len(dataset) if config.max_samples is None else min(config.max_samples, len(dataset))
    answers = [int(dataset.lengths[i]) - dataset.prompt_length(i) for i in range(count)]
    longer = sum(n > config.max_new_tokens for n in answers)
    if not longer:
        return None
    message = (f"eval.max_new_tokens={config.max_new_tokens} is shorter than {longer} of the {count} evaluated "
               f"reference answers (longest {max(answers)} tokens with its end-of-turn): generation stops before "
               "they end; raise eval.max_new_tokens")
    log.warning(message)
    return message


def eval_records(dataset: ShardedDataset, config: EvalConfig) -> list[dict]:
    """The source records of the first `eval.max_samples` rows of the eval split."""
    count = len(dataset) if config.max_samples is None else min(config.max_samples, len(dataset))
    return [json.loads(dataset.record_json(i)) for i in range(count)]


def evaluate_generation(model, tokenizer, dataset: ShardedDataset, task: ChatTask, config: EvalConfig,
                        device: torch.device, judge: Judge | None = None,
                        reports: Path | None = None) -> tuple[dict[str, float], list[dict]]:
    """Task metrics plus timing for the eval split's first `eval.max_samples` rows (prompts as tokenized in the
    shards), with the model's own metrics and `answer_nll`; also returns (prompt record, output) examples. With
    `reports` (a path prefix), the per-class tables and confusion matrices of closed-set fields are written there
    (`run_files.write_class_reports`)."""
    records = eval_records(dataset, config)
    prompts = [dataset.tokens(i)[: dataset.prompt_length(i)].tolist() for i in range(len(records))]
    return score_answers(
        lambda: generate_answers(model, tokenizer, prompts, config.max_new_tokens, config.batch_size, device),
        records, task, judge, reports,
        model_metrics=lambda: {**task.model_metrics(model, tokenizer, records, device),
                               "answer_nll": answer_nll(model, dataset, len(records), device, config.batch_size)})


def evaluate_records(model, tokenizer, records: list[dict], task: ChatTask, config: EvalConfig, device: torch.device,
                     judge: Judge | None = None, reports: Path | None = None) -> tuple[dict[str, float], list[dict]]:
    """Generation eval of records that are not in the shards (e.g. with retrieved context): prompts from the task's
    formatter through the chat template, as `multitune infer` builds them."""
    prompts = chat_encoder(tokenizer).encode_prompts([task.format(r).messages for r in records])
    return score_answers(
        lambda: generate_answers(model, tokenizer, prompts, config.max_new_tokens, config.batch_size, device),
        records, task, judge, reports, model_metrics=lambda: task.model_metrics(model, tokenizer, records, device))


def evaluate_endpoint(client: EndpointClient, records: list[dict], task: ChatTask, config: EvalConfig,
                      judge: Judge | None = None, reports: Path | None = None) -> tuple[dict[str, float], list[dict]]:
    """Eval records (prompts from the task's formatter) answered by an OpenAI-compatible endpoint, scored by the
    task; metrics that need the weights (answer_nll, log-likelihoods) stay empty."""
    return score_answers(
        lambda: [text.strip() for text in client.chat_many([task.format(r).messages for r in records],
                                                           config.max_new_tokens)],
        records, task, judge, reports)


def score_answers(answer: Callable[[], list[str]], records: list[dict], task: ChatTask, judge: Judge | None,
                  reports: Path | None, model_metrics: Callable[[], dict] | None = None) -> tuple[dict, list[dict]]:
    """The one evaluation path: `answer()` gives one output per record (timed, with `model_metrics()` when the
    weights are at hand), the task scores them, the per-class reports go to `reports`, the judge (if any) grades
    the examples. Returns (metrics with `samples` and `seconds`, examples)."""
    started = time.perf_counter()
    outputs = answer()
    metrics = task.score(outputs, records)
    if model_metrics is not None:
        metrics.update(model_metrics())
    metrics["samples"] = len(records)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    if reports is not None:
        write_class_reports(task.class_reports(outputs, records), reports)
    return metrics, _judged_examples(metrics, judge, task, outputs, records)


def _judged_examples(metrics: dict, judge: Judge | None, task: ChatTask, outputs: list[str],
                     records: list[dict]) -> list[dict]:
    """The first examples for inspection; with a judge, its metrics join `metrics` and its verdicts the examples."""
    examples = [{"record": r, "output": o} for r, o in zip(records[:5], outputs[:5])]
    if judge is not None:
        judged, verdicts = judge.grade(task, outputs, records)
        metrics.update(judged)
        for example, verdict in zip(examples, verdicts):
            example["judge"] = verdict
    return examples


def load_for_eval(recipe: Recipe, adapter: Path | None):
    """(model, tokenizer, device): the recipe's base model as the recipe loads it, optionally with an adapter."""
    if adapter is not None:
        check_adapter_folder(adapter)
        check_base(adapter, recipe.model.name_or_path, "model.name_or_path=PATH")
    tokenizer = load_tokenizer(recipe.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(recipe.model, AdapterConfig(kind="none"), device, gradient_checkpointing=False)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    return model, tokenizer, device


def evaluate_recipe(recipe: Recipe, adapters: list[Path], include_base: bool = True,
                    endpoint: EndpointClient | None = None, judge: Judge | None = None,
                    retriever: Retriever | None = None, top_k: int = 3) -> tuple[dict[str, dict], str]:
    """`multitune eval`: the base model, each adapter and an optional OpenAI-compatible endpoint on the recipe's eval
    split → per-model JSON files and one comparison table (`eval/comparison.csv`, `eval/comparison.md`). A judge adds
    its score rows to every column; a retriever adds a `<column>+rag` column with the top-k passages in the prompt.
    Returns (metrics by label, table text)."""
    task = task_for(recipe)
    if retriever is not None and not task.accepts_context:
        raise InputError(f"--retrieval-docs: task {task.name} does not show retrieved passages in its prompt "
                         "(medical_qa and medical_mcq do)")
    for adapter in adapters:  # a wrong adapter fails before any work
        check_adapter_folder(adapter)
        check_base(adapter, recipe.model.name_or_path, "model.name_or_path=PATH")
    out_dir = recipe.output_path / "eval"
    prepared = prepare(task, recipe.data, load_tokenizer(recipe.model))
    task = task.with_labels(prepared.labels)  # the prompts training saw
    eval_set = ShardedDataset(prepared.split("eval"))
    cut = warn_if_answers_exceed(eval_set, recipe.eval)

    def reports(label: str) -> Path:
        return out_dir / "per_class" / label.replace("/", "_")

    records = eval_records(eval_set, recipe.eval)
    rag_records = retriever.augment(records, top_k) if retriever is not None else None
    if judge is not None:
        judge.client.chat([{"role": "user", "content": "Reply with OK."}], max_tokens=1)  # down → fail before work
    results: dict[str, dict] = {}

    def save_column(label: str, metrics: dict, examples: list[dict], source: dict) -> None:
        while label in results:
            label += "'"
        results[label] = metrics
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / f"{label.replace('/', '_')}.json",
                     json.dumps({**source, **metrics, "examples": examples}, indent=2, default=str))

    endpoint_results = []
    if endpoint is not None:  # first: a wrong URL or key fails in seconds, not after the local evaluations
        name = endpoint.spec.model
        endpoint_results.append(evaluate_endpoint(endpoint, records, task, recipe.eval, judge, reports(name)))
        if rag_records is not None:
            endpoint_results.append(evaluate_endpoint(endpoint, rag_records, task, recipe.eval, judge,
                                                      reports(f"{name}+rag")))
    for adapter in ([None] if include_base else []) + list(adapters):
        model, tokenizer, device = load_for_eval(recipe, adapter)
        source = {"model": recipe.model.name_or_path, "adapter": str(adapter) if adapter else None}
        label = _label(adapter, results)
        save_column(label, *evaluate_generation(model, tokenizer, eval_set, task, recipe.eval, device, judge,
                                                reports(label)), source)
        if rag_records is not None:
            save_column(f"{label}+rag", *evaluate_records(model, tokenizer, rag_records, task, recipe.eval, device,
                                                          judge, reports(f"{label}+rag")),
                        {**source, "retrieval_top_k": top_k})
        del model
    source = {"endpoint": endpoint.spec.base_url, "model": endpoint.spec.model} if endpoint else {}
    for result, suffix in zip(endpoint_results, ("", "+rag")):
        save_column(endpoint.spec.model + suffix, *result, source)
    rows = comparison_rows(results, task.headline_metrics)
    write_atomic(out_dir / "comparison.csv", "\n".join(",".join(row) for row in rows) + "\n")
    table = markdown_table(rows) + (f"\n\nnote: {cut}" if cut else "")  # next to the scores it explains
    write_atomic(out_dir / "comparison.md", table + "\n")
    return results, table


def _label(adapter: Path | None, taken: dict) -> str:
    if adapter is None:
        return "base"
    # runs/<name>/adapter → "<name>": the run name says more than the folder name every run shares
    label = adapter.resolve().parent.name if adapter.name == "adapter" else adapter.name
    while label in taken:
        label += "'"
    return label


def comparison_rows(results: dict[str, dict], headline: tuple[str, ...]) -> list[list[str]]:
    """Metric rows x model columns; headline metrics first, then every other numeric metric, timing last."""
    names = list(headline) + sorted({k for m in results.values() for k, v in m.items()
                                     if isinstance(v, (int, float)) and k not in headline
                                     and k not in ("samples", "seconds")})
    rows = [["metric", *results]]
    for name in [*names, "samples", "seconds"]:
        values = [m.get(name) for m in results.values()]
        if all(v is None for v in values):
            continue
        rows.append([name, *("-" if v is None else f"{v:.4g}" for v in values)])
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
