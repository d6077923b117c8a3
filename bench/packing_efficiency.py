"""Benchmark 1: real tokens / token budget — multitune's BFD vs TRL's BFD (`pack_dataset`) vs padding to the longest."""

from __future__ import annotations

import numpy as np

from bench.common import model_dir

TASK_ROWS = 3000  # per task
PADDED_BATCH = 8


def task_lengths() -> np.ndarray:
    """Token lengths of every text task's generated data, rendered with the chat template (prompt + answer)."""
    from transformers import AutoTokenizer

    from multitune.data_prep.tasks import get_task
    from multitune.data_prep.tokenize import tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    lengths = []
    for name in ("ticket_classification", "it_ticket_extraction", "rca_generation", "medical_qa", "medical_mcq"):
        task = get_task(name)
        examples = [task.format(record) for record in task.generate(TASK_ROWS, seed=0)]
        lengths += [len(ids) for ids in tokenize_examples(tokenizer, examples, True).input_ids]
    return np.random.default_rng(0).permutation(lengths)  # a mixed dataset, as SFT data usually is


def long_tail_lengths(budget: int, n: int = 20_000) -> np.ndarray:
    """A long-tailed mix (log-normal, median 300 tokens): many short chats, a few near the budget."""
    lengths = np.random.default_rng(0).lognormal(mean=np.log(300), sigma=1.0, size=n)
    return np.clip(lengths.astype(np.int64), 8, budget)


def multitune_efficiency(lengths: np.ndarray, budget: int) -> float:
    from multitune.data_prep.packing import best_fit_decreasing

    rows = best_fit_decreasing(lengths, budget)
    return float(lengths.sum() / (len(rows) * budget))


def trl_efficiency(lengths: np.ndarray, budget: int) -> float:
    """TRL's own BFD, called as SFTTrainer calls it (a batched `datasets.map`, 1,000 examples per batch)."""
    from datasets import Dataset, disable_progress_bars
    from trl.data_utils import pack_dataset

    disable_progress_bars()
    dataset = Dataset.from_dict({"input_ids": [[1] * int(n) for n in lengths]})
    packed = pack_dataset(dataset, budget, strategy="bfd")
    real = sum(sum(row) for row in packed["seq_lengths"])
    return float(real / (len(packed) * budget))


def padded_efficiency(lengths: np.ndarray) -> float:
    """No packing: shuffled batches of 8, each padded to its longest sample."""
    shuffled = np.random.default_rng(0).permutation(lengths)
    batches = [shuffled[i:i + PADDED_BATCH] for i in range(0, len(shuffled), PADDED_BATCH)]
    return float(lengths.sum() / sum(len(b) * b.max() for b in batches))


def run() -> dict:
    tasks = task_lengths()
    results = {}
    for budget in (2048, 4096):
        for mix, lengths in (("tasks", np.minimum(tasks, budget)), ("long_tail", long_tail_lengths(budget))):
            results[f"{mix}@{budget}"] = {
                "samples": len(lengths), "mean_len": round(float(lengths.mean()), 1),
                "multitune": multitune_efficiency(lengths, budget), "trl_bfd": trl_efficiency(lengths, budget),
                "padded": padded_efficiency(lengths),
            }
    return results


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
