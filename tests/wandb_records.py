"""Read the records of an offline W&B run file (`run-<id>.wandb`) back, so tests check what was really logged.

The file is a 7-byte W&B header followed by a LevelDB log (32 KiB blocks of crc/length/type framed chunks) of
`wandb_internal_pb2.Record` protobufs; wandb 0.31 ships no Python reader for it.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7  # b":W&B", 0xBEE1 magic, version byte
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path, wait_s: float = 30.0) -> list[wandb_internal_pb2.Record]:
    """All records, once the run's `exit` record is on disk: wandb-core writes the file asynchronously, and under
    load the last records can land a moment after `run.finish()` has returned."""
    deadline = time.monotonic() + wait_s
    while True:
        records = _parse(Path(path).read_bytes(), path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _parse(data: bytes, path: Path) -> list[wandb_internal_pb2.Record]:
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
    return records


def history(path: Path) -> list[dict]:
    """Every run.log() call in the file, as {key: value} dicts including `_step`."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def summary(path: Path) -> dict:
    merged: dict = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                merged[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return merged


def config(path: Path) -> dict:
    merged: dict = {}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            for item in (record.run.config if kind == "run" else record.config).update:
                merged[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return merged
