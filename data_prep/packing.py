"""Packing plans: which samples share a micro-batch. Best-fit-decreasing packing, batches of similar lengths (one
sample per row), or padded batches in random order.

Our own because it is the part that decides throughput: BFD with a segment tree over remaining capacities
(O(n log budget)) packs to >99% of the budget on realistic length mixes, and the plan is a pure function of
the lengths, so every rank and every resumed run computes the same one without communication.
"""

from __future__ import annotations

import numpy as np


class _CapacityTree:
    """Counts of open bins per remaining capacity 0..budget; finds the smallest capacity >= need in O(log budget)."""

    def __init__(self, budget: int):
        self.size = 1
        while self.size < budget + 1:
            self.size *= 2
        self.count = np.zeros(2 * self.size, dtype=np.int64)

    def add(self, capacity: int, delta: int) -> None:
        node = capacity + self.size
        while node:
            self.count[node] += delta
            node //= 2

    def smallest_at_least(self, need: int) -> int | None:
        """Leftmost leaf >= need with a nonzero count, or None."""
        node = need + self.size
        if self.count[node]:
            return need
        # Climb until a right sibling to the right of our path holds something, then descend leftmost.
        while node > 1:
            if node % 2 == 0 and self.count[node + 1]:
                node += 1
                break
            node //= 2
        else:
            return None
        while node < self.size:
            node = 2 * node if self.count[2 * node] else 2 * node + 1
        return node - self.size


def best_fit_decreasing(lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Groups of sample indices whose lengths sum to at most `budget`; every sample appears exactly once."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > budget:
        raise ValueError(f"a sample of {int(lengths.max())} tokens does not fit the packing budget {budget}")
    order = np.argsort(-lengths, kind="stable")
    tree = _CapacityTree(budget)
    bins_at: dict[int, list[int]] = {}
    members: list[list[int]] = []
    for index in order.tolist():
        need = int(lengths[index])
        capacity = tree.smallest_at_least(need)
        if capacity is None:
            members.append([index])
            bin_id, remaining = len(members) - 1, budget - need
        else:
            bin_id = bins_at[capacity].pop()
            tree.add(capacity, -1)
            members[bin_id].append(index)
            remaining = capacity - need
        bins_at.setdefault(remaining, []).append(bin_id)
        tree.add(remaining, 1)
    return [np.asarray(sorted(group), dtype=np.int64) for group in members]


def padded_batches(lengths: np.ndarray, budget: int, seed: int) -> list[np.ndarray]:
    """Without packing: shuffled samples batched while `rows x longest row` stays within the token budget."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return _cut_in_order(lengths, np.random.default_rng(seed).permutation(len(lengths)), budget)


def length_grouped_batches(lengths: np.ndarray, budget: int, seed: int) -> list[np.ndarray]:
    """Samples sorted by length (ties in a seeded random order), cut into batches while `rows x longest row` stays
    within the token budget: one sample per row with little padding (neighbours in length order differ little)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ties = np.random.default_rng(seed).permutation(len(lengths))
    return _cut_in_order(lengths, ties[np.argsort(lengths[ties], kind="stable")], budget)


def _cut_in_order(lengths: np.ndarray, order: np.ndarray, budget: int) -> list[np.ndarray]:
    """`order` cut into consecutive batches while `rows x longest row` stays within `budget`; a sample over budget
    gets a batch of its own."""
    groups: list[np.ndarray] = []
    current: list[int] = []
    longest = 0
    for index in order.tolist():
        longest_if_added = max(longest, int(lengths[index]))
        if current and longest_if_added * (len(current) + 1) > budget:
            groups.append(np.asarray(current, dtype=np.int64))
            current, longest_if_added = [], int(lengths[index])
        current.append(index)
        longest = longest_if_added
    if current:
        groups.append(np.asarray(current, dtype=np.int64))
    return groups
