"""The micro-batch stream: resuming at a position continues exactly; ranks get disjoint shares covering the epoch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from test_packing import ArrayDataset

from multitune.trainer.batches import MicroBatchStream, Position, plan_micro_batches

pytestmark = pytest.mark.unit


def make_stream(world=1, rank=0, n=101):
    rng = np.random.default_rng(0)
    rows = [np.arange(int(k), dtype=np.int32) + 1 for k in rng.integers(5, 60, size=n)]
    dataset = ArrayDataset(rows, rows)
    plan = plan_micro_batches(dataset.lengths, 128, 256, "packed", seed=0)
    return MicroBatchStream(dataset, plan, seed=7, rank=rank, world_size=world), plan


def test_resume_from_a_position_continues_with_the_same_batches():
    stream, _ = make_stream()
    full = list(itertools.islice(stream.iterate(Position()), 40))  # crosses an epoch boundary
    resume_at, _ = full[16]
    resumed = list(itertools.islice(stream.iterate(resume_at), 23))
    for (pos_a, a), (pos_b, b) in zip(full[17:], resumed):
        assert pos_a == pos_b
        assert a.input_ids.tolist() == b.input_ids.tolist()


def test_epochs_reshuffle_but_cover_the_same_plan():
    stream, plan = make_stream()
    assert not np.array_equal(stream.share(0), stream.share(1))
    assert sorted(stream.share(0).tolist()) == sorted(stream.share(1).tolist()) == list(range(len(plan)))


def test_ranks_see_every_sample_exactly_once_per_epoch():
    world = 3
    streams = [make_stream(world, rank)[0] for rank in range(world)]
    plan = streams[0].plan
    seen = []
    for stream in streams:
        share = stream.share(0)
        assert len(share) == stream.per_rank  # same step count on every rank
        seen += [int(i) for group in share if group >= 0 for row in plan[group] for i in row]
    assert sorted(seen) == list(range(101))


def test_filler_batch_has_no_targets():
    stream, _ = make_stream()
    batch = stream.collate([])
    assert batch.target_tokens == 0 and batch.real_tokens == 0
