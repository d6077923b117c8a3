"""Time to open a split's memory-mapped shards and read its length column: `python -m bench.shard_load SPLIT_DIR`."""

from __future__ import annotations

import json
import statistics
import sys
import time

from data_prep.shards import ShardedDataset


def main(split: str) -> dict:
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        dataset = ShardedDataset(split)
        int(dataset.lengths.sum())
        dataset.tokens(len(dataset) // 2)
        timings.append(time.perf_counter() - started)
    return {"seconds": statistics.median(timings), "rows": len(dataset)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
