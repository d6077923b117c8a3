"""Time to open a split's memory-mapped shards and read one row: `python -m bench.shard_load SPLIT_DIR`.

Median of 5 opens in one process (the first also pays pyarrow's lazy imports). Planning then reads the length
column, which is O(rows) by nature (4 MB per million rows) and is not counted here.
"""

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
        dataset.tokens(len(dataset) // 2)
        timings.append(time.perf_counter() - started)
    return {"seconds": statistics.median(timings), "rows": len(dataset)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
