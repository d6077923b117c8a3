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

from multitune.data_prep.packing import best_fit_decreasing, padded_batches
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


def plan_micro_batches(lengths: np.ndarray, seq_len: int, micro_batch_tokens: int, packing: bool, seed: int) -> Plan:
    """Packed: BFD rows of `seq_len` tokens, `micro_batch_tokens // seq_len` rows per micro-batch.
    Padded: one sample per row, as many rows as fit `micro_batch_tokens` at the longest row's width.

    Rows stay short (one sample's maximum) because sdpa/eager attention over a packed row costs row_len^2
    whatever the block mask hides; a few short rows beat one long row on everything but flash-attn varlen.
    """
    if not packing:
        return [[np.asarray([i]) for i in group] for group in padded_batches(lengths, micro_batch_tokens, seed)]
    rows = best_fit_decreasing(lengths, seq_len)
    order = np.random.default_rng(seed).permutation(len(rows))
    per_batch = max(micro_batch_tokens // seq_len, 1)
    return [[rows[i] for i in order[start:start + per_batch]] for start in range(0, len(order), per_batch)]


def plan_efficiency(lengths: np.ndarray, plan: Plan, seq_len: int, packing: bool) -> float:
    """Real tokens / token budget: rows x seq_len when packed, rows x longest row when padded."""
    rows = [row for batch in plan for row in batch]
    real = float(sum(int(lengths[row].sum()) for row in rows))
    if packing:
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
    """Block-diagonal causal mask so attention never crosses samples or touches padding.

    flash_attention_2 takes the varlen path from restarting position ids, so it needs no mask. For sdpa and
    eager, position ids alone do NOT isolate packed samples (measured: ~1.1 logit difference). sdpa gets a boolean
    mask (True = attend): a float one must match the query dtype, which a QLoRA base's fp32 upcast (fp16, or bf16
    on CPU) makes differ from the recipe's dtype. eager silently mis-handles boolean masks, so it gets an additive
    float mask (0 = attend, dtype min = blocked).
    """
    if backend == "flash_attention_2":
        return None
    seg = batch.segment_ids
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
