"""Time to open a split's memory-mapped shards and read one row: `python -m bench.shard_load SPLIT_DIR`.

One open first (it pays pyarrow's lazy imports and brings the index into the page cache), then the median of 21.
Planning then reads the length column, which is O(rows) by nature (4 MB per million rows) and is not counted here.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from multitune.data_prep.shards import ShardedDataset


def main(split: str) -> dict:
    ShardedDataset(split).tokens(0)
    timings = []
    for _ in range(21):
        started = time.perf_counter()
        dataset = ShardedDataset(split)
        dataset.tokens(len(dataset) // 2)
        timings.append(time.perf_counter() - started)
    return {"seconds": statistics.median(timings), "rows": len(dataset)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
