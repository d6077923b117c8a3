"""One prep measurement in its own process (so peak RSS is its own): `python -m bench.prep_runner SYSTEM JSONL OUT`.

multitune: `prepare()` exactly as `multitune prep` calls it. trl: `load_dataset("json")` + the task's chat
formatting + SFTTrainer's own dataset preparation (tokenize with the chat template, completion mask, BFD packing)
with one process per core (`dataset_num_proc`; multitune's prep also uses every core), minus the trainer's constant
set-up cost (measured on an 8-row dataset first). Prints one JSON line: seconds, rows, tokens.
`BENCH_MODEL=smollm2`: SmolLM2-135M-Instruct's tokenizer and chat template instead of the tiny model's.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from bench.common import model_dir, smollm2_dir
from multitune.data_prep.tasks import get_task

TASK = get_task("ticket_classification")
MAX_LEN = 2048


def model_path() -> Path:
    return smollm2_dir() if os.environ.get("BENCH_MODEL", "tiny") == "smollm2" else model_dir()


def multitune(jsonl: Path, out: Path) -> dict:
    from multitune.data_prep.prepare import prepare
    from multitune.recipes.schema import DataConfig, ModelConfig
    from multitune.trainer.model import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(model_path())))
    started = time.perf_counter()
    prepared = prepare(TASK, DataConfig(train_file=str(jsonl), cache_dir=str(out), max_seq_len=MAX_LEN), tokenizer)
    seconds = time.perf_counter() - started
    splits = prepared.manifest["splits"].values()
    return {"seconds": seconds, "rows_in": sum(1 for _ in open(jsonl, "rb")), "rows": sum(s["rows"] for s in splits),
            "tokens": sum(s["tokens"] for s in splits)}


def trl(jsonl: Path, out: Path) -> dict:
    from datasets import Dataset, disable_progress_bars, load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    model = AutoModelForCausalLM.from_pretrained(model_path(), use_safetensors=True)
    config = SFTConfig(output_dir=str(out / "trainer"), packing=True, max_length=MAX_LEN, completion_only_loss=True,
                       report_to=[], use_cpu=True, dataset_num_proc=os.cpu_count())  # all cores, as multitune

    def conversational(record):
        example = TASK.format(record)
        return {"prompt": example.messages, "completion": [{"role": "assistant", "content": example.answer}]}

    def prepared(dataset):
        dataset = dataset.map(conversational, remove_columns=dataset.column_names)
        return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer).train_dataset

    fixed = time.perf_counter()
    prepared(Dataset.from_list([json.loads(line) for line in open(jsonl, encoding="utf-8").readlines()[:8]]))
    fixed = time.perf_counter() - fixed
    started = time.perf_counter()
    dataset = prepared(load_dataset("json", data_files=str(jsonl), split="train", cache_dir=str(out / "hf")))
    seconds = time.perf_counter() - started - fixed
    tokens = sum(sum(row) for row in dataset["seq_lengths"])
    return {"seconds": seconds, "rows_in": sum(1 for _ in open(jsonl, "rb")), "rows": len(dataset), "tokens": tokens}


if __name__ == "__main__":
    system, jsonl, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    print(json.dumps({"multitune": multitune, "trl": trl}[system](jsonl, out)))
