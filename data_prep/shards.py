"""Arrow IPC shards of tokenized samples: a streaming writer with an index, and a lazily memory-mapped reader."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa

SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("length", pa.int32()),
    ("prompt_length", pa.int32()),
    ("record", pa.string()),  # the source record as JSON, kept for scoring generations
])


def list_column(rows: list, dtype=np.int32) -> pa.ListArray:
    """One list-valued column (a row per sample), e.g. for `ShardWriter.write_columns`."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int32, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


# The split's index, written last: every row's length, and each record batch's (file number, rows).
LENGTHS, BATCHES = "lengths.npy", "batches.npy"


class ShardWriter:
    """Appends batches to `shard-NNNNN.arrow` files in `folder`, starting a new file every `rows_per_shard` rows;
    `close()` writes the index that lets a reader open the split without touching the shards. Every schema has
    an int32 `length` column (a row's sequence length, what packing plans from)."""

    def __init__(self, folder: Path, rows_per_shard: int = 200_000, schema: pa.Schema = SCHEMA):
        self.folder, self.schema = folder, schema
        self.rows_per_shard = rows_per_shard
        self.files: list[str] = []
        self.rows = 0
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._rows_in_file = 0
        self._lengths: list[np.ndarray] = []
        self._batches: list[tuple[int, int]] = []  # (file number, rows)
        folder.mkdir(parents=True, exist_ok=True)

    def write_columns(self, columns: dict[str, pa.Array]) -> None:
        """Append one batch given as arrays by column name (every column of the writer's schema)."""
        self.write_batch(pa.record_batch([columns[field.name] for field in self.schema], schema=self.schema))

    def write_batch(self, batch: pa.RecordBatch) -> None:
        if not batch.num_rows:
            return
        if self._writer is None or self._rows_in_file >= self.rows_per_shard:
            self._open_next()
        self._writer.write_batch(batch)
        self._lengths.append(batch.column("length").to_numpy(zero_copy_only=False).astype(np.int32))
        self._batches.append((len(self.files) - 1, batch.num_rows))
        self._rows_in_file += batch.num_rows
        self.rows += batch.num_rows

    def _open_next(self) -> None:
        self._close_file()
        name = f"shard-{len(self.files):05d}.arrow"
        self.files.append(name)
        self._writer = pa.ipc.new_file(str(self.folder / name), self.schema)
        self._rows_in_file = 0

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        self._close_file()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        np.save(self.folder / LENGTHS, lengths)
        np.save(self.folder / BATCHES, np.asarray(self._batches, dtype=np.int64).reshape(-1, 2))


class ShardedDataset:
    """All shards of one split, memory-mapped and opened lazily: opening reads only the index (its cost does not
    grow with the shards' size, measured in BENCHMARKS.md); record batches are mapped on first access."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._files = sorted(self.folder.glob("shard-*.arrow"))
        self.lengths = np.load(self.folder / LENGTHS, mmap_mode="r")
        batches = np.load(self.folder / BATCHES)
        # Batch k is record batch `_in_file[k]` of file `_file_of[k]`; rows `_starts[k]` to `_starts[k + 1]`.
        self._file_of = batches[:, 0]
        file_starts = np.searchsorted(self._file_of, self._file_of, side="left")  # files are numbered in order
        self._in_file = np.arange(len(batches)) - file_starts
        self._starts = np.concatenate([[0], np.cumsum(batches[:, 1])]).astype(np.int64)
        self._readers: dict[int, pa.ipc.RecordBatchFileReader] = {}
        self._cache: dict[int, tuple[pa.RecordBatch, dict]] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[tuple[pa.RecordBatch, dict], int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self._batch(k), index - int(self._starts[k])

    def _batch(self, k: int) -> tuple[pa.RecordBatch, dict]:
        """Record batch k and zero-copy numpy views (offsets, values) of its list columns, mapped on first use."""
        if k not in self._cache:
            file = int(self._file_of[k])
            if file not in self._readers:
                self._readers[file] = pa.ipc.open_file(pa.memory_map(str(self._files[file]), "r"))
            batch = self._readers[file].get_batch(int(self._in_file[k]))
            views = {field.name: (batch.column(field.name).offsets.to_numpy(),
                                  batch.column(field.name).values.to_numpy())
                     for field in batch.schema if pa.types.is_list(field.type)}
            self._cache[k] = (batch, views)
        return self._cache[k]

    def tokens(self, index: int, column: str = "input_ids") -> np.ndarray:
        """Zero-copy view of one row's values in a list column (input_ids, labels, or a task's own columns)."""
        (_, views), row = self._locate(index)
        offsets, values = views[column]
        return values[offsets[row]:offsets[row + 1]]

    def prompt_length(self, index: int) -> int:
        (batch, _), row = self._locate(index)
        return batch.column("prompt_length")[row].as_py()

    def record_json(self, index: int) -> str | None:
        (batch, _), row = self._locate(index)
        return batch.column("record")[row].as_py()
