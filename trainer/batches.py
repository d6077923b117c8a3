"""Resumable micro-batch stream: packing plan → per-epoch shuffled order → this rank's share → tensors.

Our own rather than a DataLoader + sampler: the stream's position is two integers (epoch, index), so a resumed
run, on any number of steps, continues with exactly the next micro-batch, and each rank's share is a pure
function of (plan, seed, epoch, rank, world size), with no communication.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from multitune.data_prep.packing import best_fit_decreasing, length_grouped_batches, padded_batches
from multitune.data_prep.shards import ShardedDataset
from multitune.data_prep.tokenize import IGNORE


@dataclass(frozen=True)
class Position:
    """Where the stream continues: micro-batch `index` of `epoch` (in this rank's share)."""

    epoch: int = 0
    index: int = 0


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (rows, length)
    position_ids: torch.Tensor  # (rows, length), restarting at 0 for every packed sample
    targets: torch.Tensor  # (rows, length): the token each position must predict, IGNORE where none
    segment_ids: torch.Tensor  # (rows, length): which sample of the row a position belongs to, -1 for padding
    real_tokens: int
    target_tokens: int

    def to(self, device: torch.device) -> MicroBatch:
        return MicroBatch(self.input_ids.to(device), self.position_ids.to(device), self.targets.to(device),
                          self.segment_ids.to(device), self.real_tokens, self.target_tokens)


Plan = list[list[np.ndarray]]  # micro-batches → rows → sample indices

LAYOUTS = ("packed", "grouped", "padded")


def batch_layout(packing: bool, group_by_length: bool) -> str:
    """The micro-batch layout of a recipe's `data.packing` / `data.group_by_length`.

    "packed": samples back to back in rows of `max_seq_len` (BFD); attention is kept inside each sample by the
    varlen kernel (flash_attention_2) or a block-diagonal mask (sdpa/eager: every pair of the row is computed and
    transformers repeats grouped KV heads). "grouped": one sample per row, micro-batches of similar lengths: little
    padding and no mask (SmolLM2-135M, the same 16 tickets as 8 packed rows of 402 tokens vs 16 grouped rows of 201,
    forward + backward, 7 interleaved runs: median 10.66 vs 10.25 s, best 10.39 vs 9.60 s), but a micro-batch is no
    random sample of the data (on the demo task, where ticket length follows the category, 31 grouped steps learned
    less: urgency 0.48 vs 0.63). "padded": one sample per row, micro-batches in random order.
    """
    if packing:
        return "packed"
    return "grouped" if group_by_length else "padded"


def plan_micro_batches(lengths: np.ndarray, seq_len: int, micro_batch_tokens: int, layout: str, seed: int) -> Plan:
    """Micro-batches for a `layout` (`batch_layout`). packed: BFD rows of `seq_len` tokens,
    `micro_batch_tokens // seq_len` rows per micro-batch. grouped / padded: one sample per row, as many rows as fit
    `micro_batch_tokens` at the longest row's width (grouped: samples in length order; padded: in random order).

    Raises ValueError for an unknown layout or (packed) a sample longer than `seq_len`.
    """
    if layout == "padded":
        return [[np.asarray([i]) for i in group] for group in padded_batches(lengths, micro_batch_tokens, seed)]
    if layout == "grouped":
        return [[np.asarray([i]) for i in group]
                for group in length_grouped_batches(lengths, micro_batch_tokens, seed)]
    if layout != "packed":
        raise ValueError(f"unknown batch layout {layout!r}: one of {', '.join(LAYOUTS)}")
    rows = best_fit_decreasing(lengths, seq_len)
    order = np.random.default_rng(seed).permutation(len(rows))
    per_batch = max(micro_batch_tokens // seq_len, 1)
    return [[rows[i] for i in order[start:start + per_batch]] for start in range(0, len(order), per_batch)]


def plan_efficiency(lengths: np.ndarray, plan: Plan, seq_len: int, layout: str) -> float:
    """Real tokens / token budget: rows x seq_len when packed, rows x longest row otherwise."""
    rows = [row for batch in plan for row in batch]
    real = float(sum(int(lengths[row].sum()) for row in rows))
    if layout == "packed":
        return real / max(len(rows) * seq_len, 1)
    return real / max(sum(len(batch) * max(int(lengths[r].sum()) for r in batch) for batch in plan), 1)


class MicroBatchStream:
    def __init__(self, dataset: ShardedDataset, plan: Plan, seed: int,
                 rank: int = 0, world_size: int = 1, pad_id: int = 0):
        if not plan:
            raise ValueError("empty micro-batch plan")
        self.dataset, self.plan, self.seed = dataset, plan, seed
        self.rank, self.world_size, self.pad_id = rank, world_size, pad_id
        # Every rank runs the same number of micro-batches per epoch; ranks short of one get an empty batch.
        self.per_rank = -(-len(plan) // world_size)

    def share(self, epoch: int) -> np.ndarray:
        """Indices into the plan for this rank in `epoch` (-1 = an empty filler batch)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.plan))
        padded = np.full(self.per_rank * self.world_size, -1, dtype=np.int64)
        padded[: len(order)] = order
        return padded[self.rank :: self.world_size]

    def iterate(self, start: Position) -> Iterator[tuple[Position, MicroBatch]]:
        """Yields (position after this batch, batch) forever, crossing epochs."""
        epoch, index = start.epoch, start.index
        while True:
            share = self.share(epoch)
            while index < len(share):
                group = share[index]
                index += 1
                batch = self.collate(self.plan[group] if group >= 0 else [])
                yield Position(epoch, index), batch
            epoch, index = epoch + 1, 0

    def collate(self, rows: list[np.ndarray]) -> MicroBatch:
        """Each row holds its samples back to back (position ids restart per sample); rows are right-padded."""
        row_ids, row_targets, row_pos, row_seg = [], [], [], []
        for row in rows:
            ids = [self.dataset.tokens(int(i)) for i in row]
            labels = [self.dataset.tokens(int(i), "labels") for i in row]
            row_ids.append(np.concatenate(ids))
            row_targets.append(np.concatenate([np.append(lab[1:], IGNORE) for lab in labels]))  # never across samples
            row_pos.append(np.concatenate([np.arange(len(x)) for x in ids]))
            row_seg.append(np.concatenate([np.full(len(x), k) for k, x in enumerate(ids)]))
        real = sum(len(x) for x in row_ids)
        if not rows:  # an empty filler batch: one padding token, no targets
            row_ids, row_targets = [np.array([self.pad_id])], [np.array([IGNORE])]
            row_pos, row_seg = [np.array([0])], [np.array([0])]
        width = max(len(x) for x in row_ids)

        def stack(arrays, value):
            return torch.from_numpy(np.stack([np.pad(a, (0, width - len(a)), constant_values=value) for a in arrays])
                                    .astype(np.int64))

        targets = stack(row_targets, IGNORE)
        return MicroBatch(input_ids=stack(row_ids, self.pad_id), position_ids=stack(row_pos, 0), targets=targets,
                          segment_ids=stack(row_seg, -1), real_tokens=real,
                          target_tokens=int((targets != IGNORE).sum()))


def attention_mask_for(batch: MicroBatch, dtype: torch.dtype, backend: str) -> torch.Tensor | None:
    """Block-diagonal causal mask so attention never crosses samples or touches padding; None where none is needed.

    flash_attention_2 takes the varlen path from restarting position ids, so it needs no mask. Nor do rows that hold
    one sample each (grouped / padded layouts): they are right-padded, so the model's own causal attention keeps every
    real token to the tokens before it (sdpa's causal kernel then skips the upper triangle, and transformers lets
    sdpa handle grouped KV heads itself instead of repeating them); padding has no targets. For sdpa and
    eager, position ids alone do NOT isolate packed samples (measured: ~1.1 logit difference). sdpa gets a boolean
    mask (True = attend): a float one must match the query dtype, which a QLoRA base's fp32 upcast (fp16, or bf16
    on CPU) makes differ from the recipe's dtype. eager silently mis-handles boolean masks, so it gets an additive
    float mask (0 = attend, dtype min = blocked).
    """
    seg = batch.segment_ids
    if backend == "flash_attention_2" or int(seg.max()) <= 0:
        return None
    length = seg.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal & (seg[:, None, :] >= 0)
    # Padding rows would be fully masked (NaN under softmax); let padding attend to itself, it has no targets.
    allowed |= torch.eye(length, dtype=torch.bool, device=seg.device)
    if backend == "sdpa":
        return allowed[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
