"""Where a training step's time goes: the samples of one 4,096-token packed plan entry (8 rows x 512) of the
benchmark model (`BENCH_MODEL`: `tiny` or `smollm2`, as `bench.train_runner`), forward + backward, as packed rows
with the block-diagonal mask (multitune's default layout under sdpa) and grouped (`group_by_length`: one sample per
row, no mask), with the LM head at target positions only (multitune) or at every position (what full logits cost);
best of REPEATS interleaved runs each, and the top operators of the grouped step by self CPU time.
`python -m bench.step_profile` prints one JSON line."""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import REPO, SMOLLM2, TARGET_MODULES, model_dir
from multitune.data_prep.prepare import prepare
from multitune.data_prep.shards import ShardedDataset
from multitune.data_prep.tasks import get_task
from multitune.data_prep.tokenize import IGNORE
from multitune.recipes.schema import AdapterConfig, DataConfig, GeneratorSpec, ModelConfig
from multitune.trainer.batches import MicroBatchStream, attention_mask_for, plan_micro_batches
from multitune.trainer.lm_loss import token_loss_sum
from multitune.trainer.model import load_model, load_tokenizer

MODEL = os.environ.get("BENCH_MODEL", "tiny")
REPEATS = 5 if MODEL == "tiny" else 1  # a real-model micro-batch takes ~13 s: once each, interleaved, after a warm-up


def main() -> dict:
    torch.manual_seed(0)
    config = ModelConfig(name_or_path=str(model_dir()) if MODEL == "tiny" else SMOLLM2,
                         cache_dir=str(REPO / "cache" / "models"), dtype="float32", compute_dtype="float32",
                         attn_implementation="sdpa")
    adapter = AdapterConfig(kind="lora", r=16, alpha=32, dropout=0.0, target_modules=TARGET_MODULES)
    tokenizer = load_tokenizer(config)
    with tempfile.TemporaryDirectory() as cache:
        data = DataConfig(generator=GeneratorSpec(n_train=200, n_eval=8, seed=0), max_seq_len=512, cache_dir=cache)
        dataset = ShardedDataset(prepare(get_task("ticket_classification"), data, tokenizer).split("train"))
        plan = plan_micro_batches(dataset.lengths, 512, 4096, "packed", 0)
        stream = MicroBatchStream(dataset, plan, 0)
        packed = stream.collate(plan[0])
        samples = sorted((int(i) for row in plan[0] for i in row), key=lambda i: int(dataset.lengths[i]))
        grouped = stream.collate([np.asarray([i]) for i in samples])
    model = load_model(config, adapter, torch.device("cpu"), gradient_checkpointing=False)
    packed_mask = attention_mask_for(packed, torch.float32, "sdpa")
    batch, mask = grouped, attention_mask_for(grouped, torch.float32, "sdpa")  # None: one sample per row

    def packed_rows():
        token_loss_sum(model, packed, packed_mask).backward()

    def targets_only():
        token_loss_sum(model, batch, mask).backward()

    def full_logits():
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask, use_cache=False)
        F.cross_entropy(out.logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE,
                        reduction="sum").backward()

    steps = {"targets_only": targets_only, "packed_rows": packed_rows}
    if MODEL == "tiny":  # on SmolLM2 full logits cost 2.5x (32.0 vs 13.0 s, BENCHMARKS.md): ~1.5 min of `make bench`
        steps["full_logits"] = full_logits
    seconds = {name: float("inf") for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(REPEATS):  # interleaved: a slower minute of the machine hits every layout alike
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            seconds[name] = min(seconds[name], time.perf_counter() - started)
    with torch.profiler.profile() as profile:
        targets_only()
    ops = sorted(profile.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    total = sum(e.self_cpu_time_total for e in profile.key_averages())
    return {"rows": list(batch.input_ids.shape), "packed_rows": list(packed.input_ids.shape),
            "real_tokens": batch.real_tokens,
            "target_tokens": batch.target_tokens, **{f"{k}_s": round(v, 4) for k, v in seconds.items()},
            "top_ops": [[e.key, round(e.self_cpu_time_total / total, 3)] for e in ops]}


if __name__ == "__main__":
    print(json.dumps(main()))
