"""Packing: BFD plans are complete and within budget, and a packed sample's logits equal the sample alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multitune.data_prep.packing import _CapacityTree, best_fit_decreasing, length_grouped_batches, padded_batches
from multitune.trainer.batches import (
    MicroBatchStream,
    attention_mask_for,
    batch_layout,
    plan_efficiency,
    plan_micro_batches,
)

pytestmark = pytest.mark.unit


def test_capacity_tree_matches_brute_force():
    rng = np.random.default_rng(0)
    tree, counts = _CapacityTree(100), np.zeros(101, dtype=int)
    for _ in range(2000):
        capacity = int(rng.integers(0, 101))
        if counts[capacity] and rng.random() < 0.5:
            tree.add(capacity, -1)
            counts[capacity] -= 1
        else:
            tree.add(capacity, 1)
            counts[capacity] += 1
        need = int(rng.integers(0, 101))
        expected = next((c for c in range(need, 101) if counts[c]), None)
        assert tree.smallest_at_least(need) == expected


@pytest.mark.parametrize("budget", [512, 2048])
def test_bfd_uses_every_sample_once_and_respects_budget(budget):
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(5, 0.8, size=3000).astype(int), 4, budget)
    groups = best_fit_decreasing(lengths, budget)
    flat = np.concatenate(groups)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert max(int(lengths[g].sum()) for g in groups) <= budget
    efficiency = lengths.sum() / (len(groups) * budget)
    lower_bound = int(np.ceil(lengths.sum() / budget))
    assert len(groups) <= lower_bound * 1.02 + 1 and efficiency > 0.97


def test_bfd_rejects_a_sample_longer_than_the_budget():
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing(np.array([10, 600]), 512)


def test_padded_batches_stay_within_budget():
    lengths = np.random.default_rng(2).integers(10, 300, size=500)
    groups = padded_batches(lengths, 1024, seed=0)
    assert sorted(np.concatenate(groups).tolist()) == list(range(500))
    assert all(len(g) * lengths[g].max() <= 1024 for g in groups)


def test_length_grouped_batches_waste_little_padding_on_a_mixed_length_set():
    lengths = np.clip(np.random.default_rng(4).lognormal(5, 0.8, size=2000).astype(int), 4, 1024)
    groups = length_grouped_batches(lengths, 4096, seed=0)
    assert sorted(np.concatenate(groups).tolist()) == list(range(2000))
    assert all(len(g) * lengths[g].max() <= 4096 for g in groups)

    def efficiency(batches):
        return lengths.sum() / sum(len(g) * lengths[g].max() for g in batches)

    assert efficiency(groups) > 0.95 > 0.6 > efficiency(padded_batches(lengths, 4096, seed=0))


def test_length_grouped_batches_break_ties_by_seed_and_give_an_overlong_sample_its_own_batch():
    lengths = np.array([50] * 40 + [900])
    a, b = length_grouped_batches(lengths, 400, seed=0), length_grouped_batches(lengths, 400, seed=1)
    assert [len(g) for g in a] == [8] * 5 + [1] and a[-1].tolist() == [40]
    assert [g.tolist() for g in a] != [g.tolist() for g in b]
    assert [g.tolist() for g in a] == [g.tolist() for g in length_grouped_batches(lengths, 400, seed=0)]


def test_layout_follows_packing_and_group_by_length():
    assert batch_layout(packing=True, group_by_length=False) == "packed"
    assert batch_layout(packing=False, group_by_length=True) == "grouped"
    assert batch_layout(packing=False, group_by_length=False) == "padded"
    lengths = np.random.default_rng(5).integers(20, 200, size=300)
    grouped = plan_micro_batches(lengths, 512, 2048, "grouped", seed=0)
    assert all(len(row) == 1 for batch in grouped for row in batch)
    assert plan_efficiency(lengths, grouped, 512, "grouped") > 0.9
    with pytest.raises(ValueError, match="unknown batch layout 'bfd'"):
        plan_micro_batches(lengths, 512, 2048, "bfd", seed=0)


def test_plan_groups_rows_into_micro_batches():
    lengths = np.random.default_rng(3).integers(50, 250, size=400)
    plan = plan_micro_batches(lengths, seq_len=512, micro_batch_tokens=2048, layout="packed", seed=0)
    assert all(len(batch) <= 4 for batch in plan)
    samples = sorted(int(i) for batch in plan for row in batch for i in row)
    assert samples == list(range(400))
    assert 0.9 < plan_efficiency(lengths, plan, 512, "packed") <= 1.0


class ArrayDataset:
    """Stands in for ShardedDataset with in-memory rows (same two methods the stream uses)."""

    def __init__(self, rows, labels):
        self.rows, self.labels = rows, labels
        self.lengths = np.array([len(r) for r in rows])

    def tokens(self, index, column="input_ids"):
        return (self.rows if column == "input_ids" else self.labels)[index]


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_packed_logits_equal_each_sample_alone(tiny_model_dir, backend):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=backend)
    model.eval()
    rng = np.random.default_rng(0)
    rows = [rng.integers(5, 30000, size=n).astype(np.int32) for n in (37, 12, 50, 23)]
    stream = MicroBatchStream(ArrayDataset(rows, rows), plan=[[]], seed=0)
    # two packed rows of different lengths: [0, 1] and [2, 3] → the second row is padded too
    batch = stream.collate([np.array([0, 1]), np.array([2, 3])])
    mask = attention_mask_for(batch, torch.float32, backend)
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask).logits
        offsets = {0: (0, 0), 1: (0, 37), 2: (1, 0), 3: (1, 50)}
        for index, (row, start) in offsets.items():
            alone = model(input_ids=torch.as_tensor(rows[index], dtype=torch.long)[None]).logits[0]
            torch.testing.assert_close(packed[row, start:start + len(rows[index])], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_rows_of_one_sample_take_no_mask_and_their_logits_equal_each_sample_alone(tiny_model_dir, backend):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=backend)
    model.eval()
    rng = np.random.default_rng(1)
    rows = [rng.integers(5, 30000, size=n).astype(np.int32) for n in (41, 17, 29)]
    stream = MicroBatchStream(ArrayDataset(rows, rows), plan=[[]], seed=0)
    batch = stream.collate([np.array([0]), np.array([1]), np.array([2])])  # right-padded to 41
    assert attention_mask_for(batch, torch.float32, backend) is None
    with torch.no_grad():
        together = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
        for index, row in enumerate(rows):
            alone = model(input_ids=torch.as_tensor(row, dtype=torch.long)[None]).logits[0]
            torch.testing.assert_close(together[index, :len(row)], alone, atol=1e-5, rtol=1e-5)


def test_targets_never_cross_sample_boundaries():
    rows = [np.array([1, 2, 3], dtype=np.int32), np.array([4, 5], dtype=np.int32)]
    labels = [np.array([-100, 2, 3], dtype=np.int32), np.array([4, 5], dtype=np.int32)]
    stream = MicroBatchStream(ArrayDataset(rows, labels), plan=[[]], seed=0)
    batch = stream.collate([np.array([0, 1])])
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # position 2 (last of sample 0) must not predict token 4 (first of sample 1)
    assert batch.targets.tolist() == [[2, 3, -100, 5, -100]]
    assert batch.target_tokens == 3 and batch.real_tokens == 5
