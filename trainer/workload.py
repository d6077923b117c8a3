"""What a run trains on, behind one small interface, so trainer/loop.py stays the same loop for every task.

A workload prepares the data, builds the batch stream and the model, gives the summed loss of a micro-batch,
evaluates, and saves what was trained; each task names its own (`Task.workload`). "chat", shared by every chat task
(`TextWorkload`): tokenized chat, LM loss, generation eval, PEFT adapter + tokenizer. "event_sequence"
(trainer/process_monitoring.py: `EventWorkload`): event features, multi-task heads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from multitune.atomic import atomic_dir
from multitune.compat import attn_implementation
from multitune.data_prep.cache import PreparedData
from multitune.data_prep.prepare import prepare
from multitune.data_prep.shards import ShardedDataset
from multitune.data_prep.tasks import ChatTask, Task
from multitune.recipes.schema import Recipe
from multitune.trainer.adapter_base import record_base
from multitune.trainer.batches import MicroBatchStream, Plan, attention_mask_for
from multitune.trainer.evaluate import eval_records, evaluate_generation, warn_if_answers_exceed
from multitune.trainer.lm_loss import token_loss_sum
from multitune.trainer.model import DTYPES, load_model, load_tokenizer
from multitune.trainer.model_source import resolve_model_path
from multitune.trainer.process_monitoring import EventWorkload
from multitune.trainer.run_files import LOAD_CHAT_ADAPTER

LossFn = Callable[[torch.nn.Module, object], torch.Tensor]


class Workload(Protocol):
    task: Task
    how_to_load: str  # the "Load it" section of the adapter's model card
    notes: list[str]  # warnings `prepare` found in the data or recipe; the end-of-run table repeats them

    def prepare(self) -> PreparedData: ...
    def stream(self, dataset: ShardedDataset, plan: Plan, seed: int, rank: int, world_size: int): ...
    def load_model(self, device: torch.device, gradient_checkpointing: bool, weights: bool = True) -> torch.nn.Module:
        """The trainable model on `device`; weights=False: on the meta device where the model allows it."""
    def loss_sum(self, model, batch) -> torch.Tensor:
        """Loss summed over the batch's targets (the loop normalises by the step's target count)."""
    def evaluate(self, model, dataset: ShardedDataset, device: torch.device,
                 reports: Path | None = None) -> tuple[dict, list[dict]]:
        """Task metrics and examples; with `reports` (a path prefix), per-class tables are written there."""
    def step_metrics(self, model, dataset: ShardedDataset, device: torch.device) -> dict: ...
    def save(self, model, weights: dict[str, torch.Tensor], run_dir: Path, data_hash: str) -> Path: ...
    def write_reports(self, run_dir: Path, after: dict) -> None: ...


class TextWorkload:
    """Chat SFT: tokenizer + chat template, LM cross-entropy on target tokens, greedy-generation eval."""

    how_to_load = LOAD_CHAT_ADAPTER

    def __init__(self, recipe: Recipe, task: ChatTask):
        self.recipe, self.task = recipe, task
        self.tokenizer = None
        self.notes: list[str] = []
        self.backend = recipe.model.attn_implementation
        self.mask_dtype = DTYPES[recipe.model.dtype]

    def prepare(self) -> PreparedData:
        self.tokenizer = load_tokenizer(self.recipe.model)
        prepared = prepare(self.task, self.recipe.data, self.tokenizer)
        self.task = self.task.with_labels(prepared.labels)  # the label sets the shards' prompts were built with
        cut = warn_if_answers_exceed(ShardedDataset(prepared.split("eval")), self.recipe.eval)
        self.notes = [cut] if cut else []
        return prepared

    def stream(self, dataset, plan, seed, rank, world_size) -> MicroBatchStream:
        return MicroBatchStream(dataset, plan, seed, rank, world_size, self.tokenizer.pad_token_id)

    def load_model(self, device, gradient_checkpointing, weights=True):
        model = load_model(self.recipe.model, self.recipe.adapter, device, gradient_checkpointing, weights)
        self.backend = attn_implementation(model.config)
        return model

    def loss_sum(self, model, batch) -> torch.Tensor:
        return token_loss_sum(model, batch, attention_mask_for(batch, self.mask_dtype, self.backend))

    def evaluate(self, model, dataset, device, reports=None):
        return evaluate_generation(model, self.tokenizer, dataset, self.task, self.recipe.eval, device,
                                   reports=reports)

    def step_metrics(self, model, dataset, device) -> dict:
        return self.task.model_metrics(model, self.tokenizer, eval_records(dataset, self.recipe.eval), device)

    def save(self, model, weights, run_dir, data_hash) -> Path:
        return save_adapter(model, weights, self.tokenizer, self.recipe, self.task, run_dir, data_hash)

    def write_reports(self, run_dir: Path, after: dict) -> None:
        """Text tasks report through metrics.json and loss.png only."""


WORKLOADS: dict[str, type] = {"chat": TextWorkload, "event_sequence": EventWorkload}


def workload_for(recipe: Recipe, task: Task) -> Workload:
    """What trains `task`: the workload it declares (`Task.workload`, a key of WORKLOADS)."""
    return WORKLOADS[task.workload](recipe, task)


def save_adapter(model, weights: dict[str, torch.Tensor], tokenizer, recipe: Recipe, task: ChatTask, run_dir: Path,
                 data_hash: str) -> Path:
    """PEFT adapter (from the gathered trainable `weights`) + tokenizer + multitune.json (how the base was loaded)
    + model card, renamed into place. Full fine-tuning (every weight trainable) saves the whole model."""
    with atomic_dir(run_dir / "adapter") as tmp:
        model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # a shortcut or .gguf base is found again (merge, export) in the same converted-model cache
        info = {**record_base(tmp, recipe.model.name_or_path, resolve_model_path(recipe.model)),
                "gguf_file": recipe.model.gguf_file,
                "model_cache_dir": str(Path(recipe.model.cache_dir).expanduser().resolve()),
                "task": recipe.task, "data_hash": data_hash,
                "quantization": recipe.model.quantization, "dtype": recipe.model.dtype,
                "double_quant": recipe.model.double_quant, "compute_dtype": recipe.model.compute_dtype,
                # What `infer` and `serve` need to build exactly the prompts training saw.
                "labels": task.labels, "system_prompt": task.system_prompt()}
        (tmp / "multitune.json").write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
    return run_dir / "adapter"
