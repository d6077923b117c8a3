"""One training-throughput measurement in its own process: `python -m bench.train_runner SYSTEM OUT`.

Every system trains the same fp32 model (`BENCH_MODEL`: `tiny`, the demo-shaped random model, or `smollm2`,
SmolLM2-135M-Instruct) with LoRA r=16 on all linear layers (AdamW, lr 1e-3) for one epoch over the same generated
support tickets with completion-only loss, micro-batches of 4,096 tokens at most (rows of 512) and one micro-batch
per optimizer step; unpacked TRL runs take as many steps as multitune's plan (same real tokens per step). Timed: the
training loop only (data preparation, model loading and the final evaluation excluded). Prints one JSON line: seconds,
steps, tokens, target tokens, the last step's loss and the mean of every step's loss (per target token), and the first
optimizer step's seconds and real tokens (its one-off costs: compile, first-touch memory).

TRL systems: `trl_packed` (packing + padding-free: fastest, but on sdpa/eager samples attend across each other),
`trl_unpacked` (padded batches, no gradient checkpointing), `trl_fast` (padded batches grouped by length, no
gradient checkpointing: its fastest correct setting when memory is cheap) and `trl_default` (SFTConfig's defaults:
padded batches in random order, gradient checkpointing on; faster than `trl_fast` where page faults are dear, as on
this VM under glibc's malloc: BENCHMARKS.md). `multitune_compiled` and `trl_compiled`: the grouped settings with
each system's torch.compile switch (`train.compile`: each decoder layer; TRL's `torch_compile`: the whole model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from bench.common import ENV, REPO, SMOLLM2, TARGET_MODULES, model_dir, smollm2_dir

MODEL = os.environ.get("BENCH_MODEL", "tiny")
# tiny: ~10 optimizer steps (15 until session 10: make bench reached 24.8 min); smollm2: ~3 steps of ~4,096 tokens
# (~190 per ticket). `bench.run --quick` sets fewer.
ROWS = int(os.environ.get("BENCH_TRAIN_ROWS", 160 if MODEL == "tiny" else 64))
SEED, LR, STEP_TOKENS, ROW_LEN = 0, 1e-3, 4096, 512


def model_path() -> Path:
    return model_dir() if MODEL == "tiny" else smollm2_dir()


def records() -> list[dict]:
    from multitune.data_prep.tasks import get_task

    return get_task("ticket_classification").generate(ROWS + 8, SEED)[:ROWS]  # multitune's train split


def ticket_lengths() -> np.ndarray:
    """Token count of every benchmark ticket under the benchmark model's tokenizer and chat template."""
    from transformers import AutoTokenizer

    from multitune.data_prep.tasks import get_task
    from multitune.data_prep.tokenize import tokenize_examples

    task = get_task("ticket_classification")
    tokenized = tokenize_examples(AutoTokenizer.from_pretrained(model_path()), [task.format(r) for r in records()],
                                  True)
    return np.array([len(ids) for ids in tokenized.input_ids])


def packed_steps(lengths: np.ndarray) -> int:
    """Optimizer steps of multitune's default (packed) plan: every system takes as many."""
    from multitune.trainer.batches import plan_micro_batches

    return len(plan_micro_batches(lengths, ROW_LEN, STEP_TOKENS, "packed", SEED))


def grouped_budget(lengths: np.ndarray) -> int:
    """The smallest micro-batch token budget (multiples of 16) whose length-grouped plan takes no more steps than
    `packed_steps`: steps as many and as full as the packed plan's."""
    from multitune.trainer.batches import plan_micro_batches

    steps = packed_steps(lengths)
    return next(b for b in range(ROW_LEN, STEP_TOKENS + 1, 16)
                if len(plan_micro_batches(lengths, ROW_LEN, b, "grouped", SEED)) <= steps)


def multitune(out: Path, grouped: bool = False, compiled: bool = False) -> dict:
    """multitune's default packed rows (block mask under sdpa), or `grouped`: `group_by_length` without packing
    (one sample per row, no mask; the layout of TRL's `trl_fast`), as many steps as packed; `compiled`:
    `train.compile` (each decoder layer through torch.compile; the compile is inside the timed first steps)."""
    budget = grouped_budget(ticket_lengths()) if grouped else STEP_TOKENS
    recipe = {
        "task": "ticket_classification", "output_dir": str(out / "run"),
        "model": {"name_or_path": str(model_dir()) if MODEL == "tiny" else SMOLLM2,
                  "cache_dir": str(REPO / "cache" / "models"), "dtype": "float32", "compute_dtype": "float32",
                  "attn_implementation": "sdpa"},
        "adapter": {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGET_MODULES},
        "data": {"generator": {"n_train": ROWS, "n_eval": 8, "seed": SEED}, "max_seq_len": ROW_LEN,
                 "packing": not grouped, "group_by_length": grouped, "completion_only": True,
                 "cache_dir": str(out / "cache")},
        "train": {"epochs": 1, "lr": LR, "micro_batch_tokens": budget, "grad_accum": 1, "warmup_steps": 0,
                  "scheduler": "cosine", "seed": SEED, "compile": compiled},
        "eval": {"before_training": False, "max_samples": 1, "max_new_tokens": 1, "batch_size": 1},
        "checkpoint": {"every_steps": None},
    }
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    # a fresh inductor cache: the compile a first run on a machine pays (later runs of the same layers reuse
    # /tmp/torchinductor_$USER and skip most of it)
    env = {**ENV, "TORCHINDUCTOR_CACHE_DIR": str(out / "inductor_cache")} if compiled else ENV
    subprocess.run([sys.executable, "-m", "multitune", "train", str(path), "--overwrite"], cwd=REPO, env=env,
                   check=True, capture_output=True)
    steps = [e for e in map(json.loads, (out / "run" / "log.jsonl").read_text().splitlines()) if "eval" not in e]
    seconds = [e["tokens"] / e["tokens_per_s"] for e in steps]
    return {"seconds": sum(seconds), "steps": len(steps), "tokens": sum(e["tokens"] for e in steps),
            "target_tokens": sum(e["target_tokens"] for e in steps), "final_loss": steps[-1]["loss"],
            "mean_loss": sum(e["loss"] for e in steps) / len(steps), "first_step_seconds": seconds[0],
            "first_step_tokens": steps[0]["tokens"]}


def trl(out: Path, packed: bool, startup: bool = False, setting: str = "unpacked") -> dict:
    """TRL's SFTTrainer; `setting` for unpacked runs: `unpacked`, `fast`, `default` or `compiled` (module docstring);
    `startup`: stop after the first optimizer step and report when it ended (wall clock)."""
    from datasets import Dataset, disable_progress_bars
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from multitune.data_prep.tasks import get_task

    disable_progress_bars()
    task = get_task("ticket_classification")
    rows = []
    for record in records():
        example = task.format(record)
        rows.append({"prompt": example.messages, "completion": [{"role": "assistant", "content": example.answer}]})
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    model = AutoModelForCausalLM.from_pretrained(model_path(), dtype="float32", attn_implementation="sdpa",
                                                 use_safetensors=True)
    # Unpacked batches: as many optimizer steps as multitune's plan takes over the same samples, so a step holds
    # the same real tokens on average (multitune's rows hold whole samples: a step is often under STEP_TOKENS).
    lengths = ticket_lengths()
    steps = packed_steps(lengths)
    batch = STEP_TOKENS // ROW_LEN if packed else -(-len(lengths) // steps)
    speed = {"unpacked": {"gradient_checkpointing": False},
             "fast": {"gradient_checkpointing": False, "train_sampling_strategy": "group_by_length"},
             "default": {},
             "compiled": {"gradient_checkpointing": False, "train_sampling_strategy": "group_by_length",
                          "torch_compile": True}}[setting]
    config = SFTConfig(
        output_dir=str(out / "trl"), packing=packed, padding_free=packed, max_length=ROW_LEN,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="cosine",
        warmup_steps=0, num_train_epochs=1, completion_only_loss=True, use_cpu=True, bf16=False, save_strategy="no",
        report_to=[], logging_steps=1, dataloader_num_workers=0, seed=SEED, disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        **({"gradient_checkpointing": False} if packed else speed))
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGET_MODULES, task_type="CAUSAL_LM")

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.first_step_at = time.time()
                self.first_step = (time.perf_counter() - self.started, state.num_input_tokens_seen)
                control.should_training_stop = startup

        def on_train_end(self, *args, **kwargs):
            self.seconds = time.perf_counter() - self.started

    clock = Clock()
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora, callbacks=[clock])
    result = trainer.train()
    if startup:
        return {"first_step_at": clock.first_step_at}
    labels = trainer.train_dataset["labels"]
    tokens = sum(len(row) for row in trainer.train_dataset["input_ids"])
    target_tokens = sum(sum(1 for t in row if t != -100) for row in labels)
    history = [e for e in trainer.state.log_history if "loss" in e]
    return {"seconds": clock.seconds, "steps": result.global_step, "tokens": tokens, "target_tokens": target_tokens,
            "final_loss": history[-1]["loss"] if history else None,
            "mean_loss": sum(e["loss"] for e in history) / len(history) if history else None,
            "gradient_checkpointing": config.gradient_checkpointing, "first_step_seconds": clock.first_step[0],
            "first_step_tokens": clock.first_step[1]}


def limit() -> dict:
    """The machine's side of MFU: model FLOPs of the epoch every system trains (`bench.flops.sample_flops` over the
    same tickets) and the fp32 GEMM peak on the model's shapes at ~STEP_TOKENS rows."""
    from transformers import AutoConfig, AutoTokenizer

    from bench.flops import Shapes, sample_flops
    from multitune.data_prep.tasks import get_task
    from multitune.data_prep.tokenize import IGNORE, tokenize_examples

    shapes = Shapes.from_config(AutoConfig.from_pretrained(model_path()))
    task = get_task("ticket_classification")
    tokenized = tokenize_examples(AutoTokenizer.from_pretrained(model_path()), [task.format(r) for r in records()],
                                  True)
    # a row's last token predicts nothing; each other target label is predicted from the position before it
    flops = sum(sample_flops(shapes, len(ids), sum(1 for t in labels[1:] if t != IGNORE), 16, TARGET_MODULES)
                for ids, labels in zip(tokenized.input_ids, tokenized.labels))
    return {"epoch_flops": flops, "tokens": sum(map(len, tokenized.input_ids)), **peak()}


def peak() -> dict:
    """The fp32 GEMM peak on the model's shapes alone (`limit` without the FLOPs count)."""
    from transformers import AutoConfig

    from bench.flops import Shapes, gemm_peak

    return gemm_peak(Shapes.from_config(AutoConfig.from_pretrained(model_path())), STEP_TOKENS)


if __name__ == "__main__":
    system, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    runs = {"multitune": lambda: multitune(out), "multitune_grouped": lambda: multitune(out, grouped=True),
            "multitune_compiled": lambda: multitune(out, grouped=True, compiled=True),
            "trl_compiled": lambda: trl(out, False, setting="compiled"),
            "trl_packed": lambda: trl(out, True),
            "trl_unpacked": lambda: trl(out, False), "trl_fast": lambda: trl(out, False, setting="fast"),
            "trl_default": lambda: trl(out, False, setting="default"),
            "trl_startup": lambda: trl(out, True, startup=True), "limit": limit, "peak": peak}
    print(json.dumps(runs[system]()))
