"""The task interface: what a task brings (records, generator, chat formatting, metrics); the loop needs nothing else."""

from __future__ import annotations

import csv
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipes.errors import InputError

Record = dict[str, Any]


@dataclass(frozen=True)
class ChatExample:
    """Prompt messages plus the assistant answer the model learns to produce."""

    messages: list[dict[str, str]]
    answer: str


class Task(ABC):
    """A chat-SFT task. Subclasses live in their own folder under data_prep/tasks/ and register in TASKS."""

    name: str
    # Bump when `format` changes what it produces: it is part of the prep cache key.
    formatter_version: str = "1"
    # Record fields a user's own file must have (validated row by row).
    required_fields: tuple[str, ...] = ()
    # Metric names shown first in summaries (e.g. the demo's before/after table).
    headline_metrics: tuple[str, ...] = ()

    @abstractmethod
    def generate(self, n: int, seed: int) -> list[Record]:
        """`n` synthetic records, identical for the same seed."""

    @abstractmethod
    def format(self, record: Record) -> ChatExample:
        """The chat prompt and the target answer for one record."""

    @abstractmethod
    def score(self, outputs: list[str], records: list[Record]) -> dict[str, float]:
        """Metrics for generated `outputs` against the records they answer."""

    def check_record(self, record: Record, where: str) -> None:
        """Raise InputError naming `where` (file:line) when a record cannot be used."""
        for field in self.required_fields:
            value = record.get(field)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise InputError(f"{where}: missing field '{field}'")

    def read(self, path: str | Path) -> Iterator[Record]:
        """Records from a user's JSONL or CSV file, each validated; errors name file:line."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"data file not found: {path}")
        if path.suffix == ".csv":
            yield from self._read_csv(path)
        elif path.suffix in (".jsonl", ".json"):
            yield from self._read_jsonl(path)
        else:
            raise InputError(f"{path}: unsupported data file type '{path.suffix}' (use .jsonl or .csv)")

    def _read_jsonl(self, path: Path) -> Iterator[Record]:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                where = f"{path}:{number}"
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    raise InputError(f"{where}: not valid UTF-8") from None
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(record, dict):
                    raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
                self.check_record(record, where)
                yield record

    def _read_csv(self, path: Path) -> Iterator[Record]:
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                for number, row in enumerate(csv.DictReader(handle), start=2):
                    record = {key: value for key, value in row.items() if key is not None}
                    self.check_record(record, f"{path}:{number}")
                    yield record
        except UnicodeDecodeError:
            raise InputError(f"{path}: not valid UTF-8") from None
