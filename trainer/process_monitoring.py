"""Process monitoring in the trainer: packed event batches, the multi-task loss, evaluation (overall and per prefix
length, with the Bayes-optimal accuracy on synthetic logs) and saving/loading the model with its heads."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from multitune.atomic import atomic_dir, atomic_file, write_atomic
from multitune.data_prep.cache import PreparedData
from multitune.data_prep.shards import ShardedDataset
from multitune.data_prep.tasks.process_monitoring.features import NO_BAYES
from multitune.data_prep.tokenize import IGNORE
from multitune.recipes.schema import Recipe
from multitune.trainer.batches import MicroBatchStream, Plan, attention_mask_for, plan_micro_batches
from multitune.trainer.model import DTYPES
from multitune.trainer.sequence_model import (
    EventSequenceModel,
    build_sequence_model,
    load_sequence_model,
    model_spec,
    save_sequence_model,
)


@dataclass
class EventBatch:
    """Packed cases: rows hold cases back to back; every position is one event (a prefix end) with its targets."""

    categorical: torch.Tensor  # (rows, length, categorical features) long, 0 = padding
    continuous: torch.Tensor   # (rows, length, continuous features) float
    position_ids: torch.Tensor  # (rows, length): event index within its case
    segment_ids: torch.Tensor  # (rows, length): case slot in the row, -1 for padding
    targets: torch.Tensor      # (rows, length): next-activity class, IGNORE on padding
    remaining: torch.Tensor    # (rows, length): normalised remaining time
    bayes_pred: torch.Tensor   # (rows, length): Bayes-optimal next activity (synthetic logs), -1 otherwise
    real_tokens: int
    target_tokens: int

    def to(self, device: torch.device) -> EventBatch:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return EventBatch(**moved)


class EventBatchStream(MicroBatchStream):
    """The resumable micro-batch stream of the text tasks, collating event features instead of token ids."""

    def __init__(self, dataset: ShardedDataset, plan: Plan, seed: int, rank: int, world_size: int,
                 n_categorical: int, n_continuous: int):
        super().__init__(dataset, plan, seed, rank, world_size)
        self.n_cat, self.n_cont = n_categorical, n_continuous

    def collate(self, rows: list[np.ndarray]) -> EventBatch:
        data = self.dataset
        n_cat = self.n_cat
        fields: dict[str, list[np.ndarray]] = {k: [] for k in ("cat", "cont", "pos", "seg", "tgt", "rem", "bayes")}
        for row in rows:
            cases = [int(i) for i in row]
            fields["cat"].append(np.concatenate([data.tokens(i, "categorical").reshape(-1, n_cat) for i in cases]))
            fields["cont"].append(np.concatenate([data.tokens(i, "continuous").reshape(-1, self.n_cont)
                                                  for i in cases]))
            fields["tgt"].append(np.concatenate([data.tokens(i, "next_activity") for i in cases]))
            fields["rem"].append(np.concatenate([data.tokens(i, "remaining") for i in cases]))
            fields["bayes"].append(np.concatenate([data.tokens(i, "bayes_pred") for i in cases]))
            fields["pos"].append(np.concatenate([np.arange(data.lengths[i]) for i in cases]))
            fields["seg"].append(np.concatenate([np.full(data.lengths[i], k) for k, i in enumerate(cases)]))
        real = sum(len(x) for x in fields["tgt"])
        if not rows:  # an empty filler batch (ranks stay in step): one padding position, no target
            fields = {"cat": [np.zeros((1, n_cat))], "cont": [np.zeros((1, self.n_cont))], "pos": [np.zeros(1)],
                      "seg": [np.zeros(1)], "tgt": [np.array([IGNORE])], "rem": [np.zeros(1)],
                      "bayes": [np.array([NO_BAYES])]}
        width = max(len(x) for x in fields["tgt"])

        def stack(arrays, value, dtype):
            return torch.from_numpy(np.stack([np.pad(a, [(0, width - len(a))] + [(0, 0)] * (a.ndim - 1),
                                                     constant_values=value) for a in arrays]).astype(dtype))

        targets = stack(fields["tgt"], IGNORE, np.int64)
        return EventBatch(categorical=stack(fields["cat"], 0, np.int64),
                          continuous=stack(fields["cont"], 0, np.float32),
                          position_ids=stack(fields["pos"], 0, np.int64),
                          segment_ids=stack(fields["seg"], -1, np.int64), targets=targets,
                          remaining=stack(fields["rem"], 0, np.float32),
                          bayes_pred=stack(fields["bayes"], NO_BAYES, np.int64), real_tokens=real,
                          target_tokens=int((targets != IGNORE).sum()))


def event_stream(dataset: ShardedDataset, plan: Plan, seed: int, rank: int, world_size: int,
                 manifest: dict) -> EventBatchStream:
    return EventBatchStream(dataset, plan, seed, rank, world_size, len(manifest["categorical"]),
                            len(manifest["continuous"]))


def predict(model, batch: EventBatch, mask_dtype: torch.dtype):
    """(next-activity logits, normalised remaining time) for a batch, with the block-diagonal mask an LM needs.
    `model` may be wrapped (DDP, DeepSpeed) for training: it is called through the wrapper."""
    backend = (model.module if hasattr(model, "module") else model).attention
    mask = attention_mask_for(batch, mask_dtype, backend) if backend is not None else None
    return model(batch.categorical, batch.continuous, batch.position_ids, batch.segment_ids, mask)


def multitask_loss_sum(model, batch: EventBatch, weights, mask_dtype: torch.dtype) -> torch.Tensor:
    """Summed over every prefix: weighted cross-entropy (next activity) + L1 (normalised remaining time)."""
    logits, remaining = predict(model, batch, mask_dtype)
    has_target = batch.targets != IGNORE
    ce = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="sum")
    l1 = (remaining - batch.remaining).abs()[has_target].sum()
    return weights.next_activity * ce + weights.remaining_time * l1


@torch.no_grad()
def evaluate_events(model: EventSequenceModel, dataset: ShardedDataset, manifest: dict, max_cases: int | None,
                    micro_batch_tokens: int, seq_len: int, device: torch.device, mask_dtype: torch.dtype) -> dict:
    """Next-activity accuracy and remaining-time MAE (days) over every prefix of the eval cases, also per prefix
    length; on synthetic logs the accuracy of the Bayes-optimal predictor on the same prefixes."""
    started = time.perf_counter()
    count = len(dataset) if max_cases is None else min(max_cases, len(dataset))
    lengths = dataset.lengths[:count]
    plan = plan_micro_batches(lengths, seq_len, micro_batch_tokens, "packed", seed=0)
    stream = event_stream(dataset, plan, 0, 0, 1, manifest)
    was_training = model.training
    model.eval()
    hits, errors, prefix, bayes_hits = [], [], [], []
    scale = manifest["remaining_scale_days"]
    try:
        for rows in plan:
            batch = stream.collate(rows).to(device)
            logits, remaining = predict(model, batch, mask_dtype)
            keep = batch.targets != IGNORE
            hits.append((logits.argmax(-1) == batch.targets)[keep].cpu())
            errors.append(((remaining - batch.remaining).abs() * scale)[keep].cpu())
            prefix.append((batch.position_ids + 1)[keep].cpu())
            bayes_hits.append(((batch.bayes_pred == batch.targets) & (batch.bayes_pred != NO_BAYES))[keep].cpu())
    finally:
        model.train(was_training)
    hits, errors, prefix = torch.cat(hits).float(), torch.cat(errors).double(), torch.cat(prefix)
    bayes_hits = torch.cat(bayes_hits).float()
    metrics = {"next_activity_acc": round(hits.mean().item(), 4),
               "remaining_time_mae_days": round(errors.mean().item(), 4)}
    if manifest.get("synthetic"):
        metrics["bayes_optimal_acc"] = round(bayes_hits.mean().item(), 4)
    per_prefix = {}
    for length in sorted(set(prefix.tolist())):
        at = prefix == length
        per_prefix[str(length)] = {"prefixes": int(at.sum()), "next_activity_acc": round(hits[at].mean().item(), 4),
                                   "remaining_time_mae_days": round(errors[at].mean().item(), 4)}
        if manifest.get("synthetic"):
            per_prefix[str(length)]["bayes_optimal_acc"] = round(bayes_hits[at].mean().item(), 4)
    metrics.update({"per_prefix_length": per_prefix, "prefixes": int(hits.numel()), "samples": count,
                    "seconds": round(time.perf_counter() - started, 2)})
    return metrics


def plot_per_prefix(metrics: dict, path: Path) -> None:
    """Accuracy and MAE against prefix length (bars: how many prefixes of that length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = metrics["per_prefix_length"]
    lengths = [int(k) for k in per]
    fig, (acc_ax, mae_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    acc_ax.plot(lengths, [per[str(k)]["next_activity_acc"] for k in lengths], "o-", label="model")
    if "bayes_optimal_acc" in metrics:
        acc_ax.plot(lengths, [per[str(k)]["bayes_optimal_acc"] for k in lengths], "s--", color="gray",
                    label="Bayes-optimal")
    acc_ax.set(xlabel="prefix length (events)", ylabel="next-activity accuracy", ylim=(0, 1.02))
    acc_ax.legend()
    mae_ax.plot(lengths, [per[str(k)]["remaining_time_mae_days"] for k in lengths], "o-", color="C1")
    mae_ax.set(xlabel="prefix length (events)", ylabel="remaining-time MAE (days)")
    for ax in (acc_ax, mae_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


class EventWorkload:
    """What the loop needs from a process-monitoring run (see trainer/workload.py for the interface)."""

    how_to_load = """The folder holds the PEFT adapter of the backbone (when LoRA), the input layer and heads
(`sequence_model.safetensors`) and what rebuilds the model and its features (`sequence_model.json`):

```python
from pathlib import Path

import torch
from multitune.trainer.sequence_model import load_sequence_model

model, spec = load_sequence_model(Path("path/to/adapter"), torch.device("cpu"))
# model(categorical, continuous, position_ids, segment_ids, attention_mask) -> (next-activity logits,
# remaining time / spec["features"]["remaining_scale_days"])
```"""

    def __init__(self, recipe: Recipe, task):
        self.recipe, self.task = recipe, task
        self.mask_dtype = DTYPES[recipe.model.dtype]
        self.manifest: dict | None = None
        self.notes: list[str] = []

    def prepare(self) -> PreparedData:
        prepared = self.task.prepare(self.recipe)
        self.manifest = prepared.manifest
        return prepared

    def stream(self, dataset: ShardedDataset, plan: Plan, seed: int, rank: int, world_size: int):
        return event_stream(dataset, plan, seed, rank, world_size, self.manifest)

    def spec(self) -> dict:
        return model_spec(self.recipe.model, self.recipe.adapter, self.recipe.process, self.manifest)

    def load_model(self, device: torch.device, gradient_checkpointing: bool, weights: bool = True):
        """Always with weights (input layer and heads are initialised here); under FSDP2 rank 0's replace the rest."""
        return build_sequence_model(self.spec(), device, gradient_checkpointing)

    def loss_sum(self, model, batch: EventBatch) -> torch.Tensor:
        return multitask_loss_sum(model, batch, self.recipe.process.loss_weights, self.mask_dtype)

    def evaluate(self, model, dataset: ShardedDataset, device: torch.device,
                 reports: Path | None = None) -> tuple[dict, list[dict]]:
        cfg = self.recipe
        metrics = evaluate_events(model, dataset, self.manifest, cfg.eval.max_samples, cfg.train.micro_batch_tokens,
                                  cfg.data.max_seq_len, device, self.mask_dtype)
        return metrics, []

    def step_metrics(self, model, dataset: ShardedDataset, device: torch.device) -> dict:
        metrics, _ = self.evaluate(model, dataset, device)
        return {k: v for k, v in metrics.items() if k in self.task.headline_metrics}

    def save(self, model, weights: dict[str, torch.Tensor], run_dir: Path, data_hash: str) -> Path:
        with atomic_dir(run_dir / "adapter") as tmp:
            save_sequence_model(model, weights, self.spec(), tmp)
            info = {"base_model": self.recipe.model.name_or_path, "task": self.task.name, "data_hash": data_hash,
                    "backbone": self.recipe.process.backbone}
            (tmp / "multitune.json").write_text(json.dumps(info, indent=2))
        return run_dir / "adapter"

    def write_reports(self, run_dir: Path, after: dict) -> None:
        plot_per_prefix(after, run_dir / "per_prefix.png")
        write_atomic(run_dir / "per_prefix.json", json.dumps(after["per_prefix_length"], indent=2))


__all__ = ["EventBatch", "EventWorkload", "evaluate_events", "load_sequence_model", "predict"]
