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

# One row of a data file longer than this is refused: no sample a model trains on is 8 MiB of text, and reading
# such a line (a file without line breaks, a binary file) would only hold its whole size in memory.
MAX_LINE_BYTES = 8 << 20


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
    # The subset needed to build a prompt: what `multitune infer` requires of new, unlabelled rows.
    input_fields: tuple[str, ...] = ()
    # Metric names shown first in summaries (e.g. the demo's before/after table).
    headline_metrics: tuple[str, ...] = ()
    # Prompts show a record's `context` passages: retrieval-augmented evaluation (`multitune eval --retrieval-docs`).
    accepts_context: bool = False

    @abstractmethod
    def generate(self, n: int, seed: int) -> list[Record]:
        """`n` synthetic records, identical for the same seed."""

    @abstractmethod
    def format(self, record: Record) -> ChatExample:
        """The chat prompt and the target answer for one record."""

    @abstractmethod
    def score(self, outputs: list[str], records: list[Record]) -> dict[str, float]:
        """Metrics for generated `outputs` against the records they answer."""

    def with_options(self, options) -> Task:
        """This task configured by the recipe's `data.task_options`; only option-taking tasks accept non-defaults."""
        if options != type(options)():
            raise InputError(f"data.task_options: task {self.name} takes no options (they are for chat_jsonl)")
        return self

    def prompt_messages(self, record: Record) -> list[dict[str, str]]:
        """The prompt alone; tasks that can answer unlabelled rows (`multitune infer`) build it without labels."""
        return self.format(record).messages

    def parse_output(self, text: str) -> dict[str, Any]:
        """What `multitune infer` writes for one generation: `valid` plus the parsed answer (or why not)."""
        return {"valid": bool(text.strip()), "answer": text, "problems": [] if text.strip() else ["empty output"]}

    def model_metrics(self, model, tokenizer, records: list[Record], device) -> dict[str, float]:
        """Metrics that need the model itself rather than its generations (e.g. option log-likelihood).

        Run with every generation eval and at every `eval.every_steps` during training; most tasks have none.
        """
        return {}

    def check_input(self, record: Record, where: str) -> None:
        """Raise InputError naming `where` when an unlabelled row lacks a field the prompt needs."""
        self._check_fields(record, where, self.input_fields)

    def check_record(self, record: Record, where: str) -> None:
        """Raise InputError naming `where` (file:line) when a record cannot be used."""
        self._check_fields(record, where, self.required_fields)

    @staticmethod
    def _check_fields(record: Record, where: str, fields: tuple[str, ...]) -> None:
        for field in fields:
            value = record.get(field)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise InputError(f"{where}: missing field '{field}'")

    def read(self, path: str | Path, inputs_only: bool = False) -> Iterator[Record]:
        """Records from a user's JSONL or CSV file, each validated; errors name file:line. A file without any
        record, or two records with the same `id`, is an error too.

        `inputs_only`: rows to answer, not to train on, so only `input_fields` are required.
        """
        path = Path(path)
        check = self.check_input if inputs_only else self.check_record
        if not path.is_file():
            raise InputError(f"data file not found: {path}")
        if path.suffix not in (".csv", ".jsonl", ".json"):
            raise InputError(f"{path}: unsupported data file type '{path.suffix}' (use .jsonl or .csv)")
        # Hashes only (~64 bytes per row): a million rows must not cost what keeping their ids would. A repeated
        # hash is confirmed, and its first line found, by reading the file again up to here (only on that path).
        seen: set[int] = set()
        count = 0
        for where, record in self._rows(path, check):
            if record.get("id") is not None:
                key = hash(str(record["id"]))
                if key in seen:
                    first = next((w for w, r in self._rows(path, check) if str(r.get("id")) == str(record["id"])), where)
                    if first != where:
                        raise InputError(f"{where}: duplicate id {record['id']!r} (first at line "
                                         f"{first.rsplit(':', 1)[1]})")
                seen.add(key)
            count += 1
            yield record
        if count == 0:
            raise InputError(f"{path}: no records in the file (empty)")

    def _rows(self, path: Path, check) -> Iterator[tuple[str, Record]]:
        return self._read_csv(path, check) if path.suffix == ".csv" else self._read_jsonl(path, check)

    def _read_jsonl(self, path: Path, check) -> Iterator[tuple[str, Record]]:
        with open(path, "rb") as handle:
            for number, raw in enumerate(iter(lambda: handle.readline(MAX_LINE_BYTES + 1), b""), start=1):
                where = f"{path}:{number}"
                if len(raw) > MAX_LINE_BYTES:
                    raise InputError(f"{where}: line longer than {MAX_LINE_BYTES >> 20} MiB (a binary file, or "
                                     f"records without line breaks?)")
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    raise InputError(f"{where}: not valid UTF-8") from None
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    detail = exc.msg if exc.msg.endswith(" at") else f"{exc.msg} at"
                    raise InputError(f"{where}: malformed JSON ({detail} column {exc.colno})") from None
                if not isinstance(record, dict):
                    raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
                check(record, where)
                yield where, record

    def _read_csv(self, path: Path, check) -> Iterator[tuple[str, Record]]:
        csv.field_size_limit(MAX_LINE_BYTES)
        reader = None
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle, strict=True)
                for row in reader:
                    where = f"{path}:{reader.line_num}"
                    if None in row:
                        raise InputError(f"{where}: more values than the {len(reader.fieldnames)} header columns")
                    check(row, where)
                    yield where, row
        except UnicodeDecodeError:
            raise InputError(f"{path}: not valid UTF-8") from None
        except csv.Error as exc:
            line = reader.line_num + 1 if reader is not None else 1  # the line being read when it failed
            raise InputError(f"{path}:{line}: malformed CSV ({exc})") from None
