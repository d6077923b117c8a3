"""Arrow IPC shards of tokenized samples: a streaming writer, and a memory-mapped reader with O(1) row access."""

from __future__ import annotations

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


def _list_array(rows: list, dtype=np.int32) -> pa.ListArray:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int32, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter((t for r in rows for t in r), dtype=dtype, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def list_column(rows: list, dtype=np.int32) -> pa.ListArray:
    """One list-valued column (a row per sample) for `ShardWriter.write_columns`."""
    return _list_array(rows, dtype)


class ShardWriter:
    """Appends batches to `shard-NNNNN.arrow` files in `folder`, starting a new file every `rows_per_shard` rows."""

    def __init__(self, folder: Path, rows_per_shard: int = 200_000, schema: pa.Schema = SCHEMA):
        self.folder, self.schema = folder, schema
        self.rows_per_shard = rows_per_shard
        self.files: list[str] = []
        self.rows = 0
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._rows_in_file = 0
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, input_ids, labels, prompt_lengths, records: list[str] | None) -> None:
        if not input_ids:
            return
        n = len(input_ids)
        self.write_columns({
            "input_ids": _list_array(input_ids),
            "labels": _list_array(labels),
            "length": pa.array([len(ids) for ids in input_ids], pa.int32()),
            "prompt_length": pa.array(prompt_lengths, pa.int32()),
            "record": pa.array(records if records is not None else [None] * n, pa.string()),
        })

    def write_columns(self, columns: dict[str, pa.Array]) -> None:
        """Append one batch given as arrays by column name (every column of the writer's schema)."""
        batch = pa.record_batch([columns[field.name] for field in self.schema], schema=self.schema)
        if not batch.num_rows:
            return
        if self._writer is None or self._rows_in_file >= self.rows_per_shard:
            self._open_next()
        self._writer.write_batch(batch)
        self._rows_in_file += batch.num_rows
        self.rows += batch.num_rows

    def _open_next(self) -> None:
        self.close()
        name = f"shard-{len(self.files):05d}.arrow"
        self.files.append(name)
        self._writer = pa.ipc.new_file(str(self.folder / name), self.schema)
        self._rows_in_file = 0

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ShardedDataset:
    """All shards of one split, memory-mapped: opening costs the same for 10k or 10M rows; rows are read on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._batches: list[pa.RecordBatch] = []
        for path in sorted(self.folder.glob("shard-*.arrow")):
            reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
            self._batches += [b for b in (reader.get_batch(i) for i in range(reader.num_record_batches)) if b.num_rows]
        # Zero-copy numpy views (offsets, values) per record batch and list column.
        self._lists = [
            {field.name: (b.column(field.name).offsets.to_numpy(), b.column(field.name).values.to_numpy())
             for field in b.schema if pa.types.is_list(field.type)}
            for b in self._batches
        ]
        counts = [b.num_rows for b in self._batches]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.lengths = (
            np.concatenate([b.column("length").to_numpy() for b in self._batches])
            if self._batches else np.zeros(0, dtype=np.int32)
        )

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        chunk = int(np.searchsorted(self._starts, index, side="right")) - 1
        return chunk, index - int(self._starts[chunk])

    def tokens(self, index: int, column: str = "input_ids") -> np.ndarray:
        """Zero-copy view of one row's values in a list column (input_ids, labels, or a task's own columns)."""
        chunk, row = self._locate(index)
        offsets, values = self._lists[chunk][column]
        return values[offsets[row]:offsets[row + 1]]

    def prompt_length(self, index: int) -> int:
        chunk, row = self._locate(index)
        return self._batches[chunk].column("prompt_length")[row].as_py()

    def record_json(self, index: int) -> str | None:
        chunk, row = self._locate(index)
        return self._batches[chunk].column("record")[row].as_py()
