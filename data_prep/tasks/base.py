"""The task interfaces: what every task declares (`Task`), and what a chat-SFT task brings (`ChatTask`: records,
generator, chat formatting, metrics); the loop needs nothing else."""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from multitune.data_prep.readers import MAX_LINE_BYTES, FieldError, Record, read_rows
from multitune.recipes.errors import InputError

__all__ = ["MAX_LINE_BYTES", "ChatExample", "ChatTask", "FieldError", "Record", "Task"]


@dataclass(frozen=True)
class ChatExample:
    """Prompt messages plus the assistant answer the model learns to produce."""

    messages: list[dict[str, str]]
    answer: str


class Task(ABC):
    """What every task declares. Subclasses live in their own folder under data_prep/tasks/ and register in TASKS.

    `workload` names how the trainer prepares, batches, models, evaluates and saves the task (trainer/workload.py:
    `WORKLOADS`): "chat" for every `ChatTask` (tokenized chat, LM loss, generation eval, PEFT adapter);
    "event_sequence" for process monitoring (event features, input layer + backbone + heads).
    """

    name: str
    workload: ClassVar[Literal["chat", "event_sequence"]]
    # Metric names shown first in summaries (e.g. the demo's before/after table).
    headline_metrics: tuple[str, ...] = ()

    @abstractmethod
    def generate(self, n: int, seed: int) -> list[Record]:
        """`n` synthetic records, identical for the same seed."""

    @abstractmethod
    def with_options(self, options) -> Task:
        """This task configured by the recipe's `data.task_options`. Raises InputError naming a key it does not
        take."""

    def check_columns(self, columns: Mapping[str, str]) -> None:  # noqa: B027 - an optional hook, no-op by default
        """Raise InputError naming a `data.columns` key the task cannot map (tasks without record fields: none)."""


class ChatTask(Task):
    """A chat-SFT task: records → chat prompt + answer, scored on the model's generations."""

    workload = "chat"
    # Bump when `format` changes what it produces: it is part of the prep cache key.
    formatter_version: str = "1"
    # Record fields a user's own file must have (validated row by row).
    required_fields: tuple[str, ...] = ()
    # The subset needed to build a prompt: what `multitune infer` requires of new, unlabelled rows.
    input_fields: tuple[str, ...] = ()
    # Prompts show a record's `context` passages: retrieval-augmented evaluation (`multitune eval --retrieval-docs`).
    accepts_context: bool = False

    @abstractmethod
    def format(self, record: Record) -> ChatExample:
        """The chat prompt and the target answer for one record."""

    @abstractmethod
    def score(self, outputs: list[str], records: list[Record]) -> dict[str, float]:
        """Metrics for generated `outputs` against the records they answer."""

    # Fields a record may have besides the required ones (the prompt uses them when present).
    optional_fields: tuple[str, ...] = ()
    # Keys of `data.task_options` this task reads; any other key set to a non-default value is refused.
    option_keys: frozenset[str] = frozenset()
    # Rows of the shape {"input": {...fields}, "output": {...answer fields}} are flattened into one record.
    instruction_rows: bool = False

    def with_options(self, options) -> ChatTask:
        defaults = type(options)()
        for key in type(options).model_fields:
            if getattr(options, key) != getattr(defaults, key) and key not in self.option_keys:
                takes = f"it takes {', '.join(sorted(self.option_keys))}" if self.option_keys else "it takes none"
                raise InputError(f"data.task_options.{key}: task {self.name} does not take this option ({takes})")
        return self._configured(options) if self.option_keys else self

    def known_fields(self) -> tuple[str, ...]:
        """Every record field the task reads: what `data.columns` may map."""
        return tuple(dict.fromkeys((*self.input_fields, *self.required_fields, *self.optional_fields, "id")))

    def check_columns(self, columns: Mapping[str, str]) -> None:
        """Raise InputError naming a `data.columns` key that is no field of this task (a typo would otherwise show
        up later as a missing field, without the key that caused it)."""
        known = self.known_fields()
        for field in columns:
            if field not in known:
                close = difflib.get_close_matches(field, known, n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'?" if close else f"its fields: {', '.join(known)}"
                raise InputError(f"data.columns.{field}: not a field of task {self.name} ({hint})")

    def _configured(self, options) -> ChatTask:
        """A copy of this task with `options` applied (tasks with `option_keys` override this)."""
        return self

    # --- Labels: the closed label sets of a task's answer fields (None: the task has none) --------------------------
    @property
    def labels(self) -> dict | None:
        """The label sets the prompt and the per-class metrics use, as JSON (recorded in the manifest and adapter)."""
        return None

    def needs_labels(self) -> bool:
        """True when the label sets must still be collected from the training split (not declared in the recipe)."""
        return False

    def generator_labels(self) -> dict | None:
        """The label sets of the task's own synthetic generator (its taxonomy), or None to collect them."""
        return None

    def collect_labels(self, records: Iterable[Record]) -> dict:
        """The label sets seen in `records` (the training split), in the form `with_labels` takes."""
        return {}

    def with_labels(self, labels: dict | None) -> ChatTask:
        """A copy with these label sets (from the manifest or an adapter folder); rows outside them are counted by
        `unseen_labels`, not refused (only declared label sets refuse rows)."""
        return self

    def unseen_labels(self, record: Record) -> list[tuple[str, str]]:
        """(field, value) pairs of `record` outside the label sets: an eval or infer row with a label never trained."""
        return []

    def system_prompt(self) -> str | None:
        """The system message every prompt of this task starts with (what `serve` defaults to), or None."""
        return None

    def class_reports(self, outputs: list[str], records: list[Record]) -> dict:
        """Per closed-set field: a `json_metrics.ClassReport` (per-class precision/recall/F1, confusion matrix)."""
        return {}

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
                raise FieldError(where, field)

    def read(self, path: str | Path, inputs_only: bool = False, columns: Mapping[str, str] | None = None,
             delimiter: str | None = None) -> Iterator[Record]:
        """Records from a user's data file (data_prep/readers.py: CSV, JSONL, JSON array, Parquet), each validated;
        errors name file:line and, through `columns` (task field → the user's column), the user's column. A file
        without any record, or two records with the same `id`, is an error too.

        `inputs_only`: rows to answer, not to train on, so only `input_fields` are required.
        """
        check = self.check_input if inputs_only else self.check_record
        columns = dict(columns or {})

        def rows() -> Iterator[tuple[str, Record]]:
            needed = self.input_fields if inputs_only else None
            for where, record in read_rows(path, columns, delimiter, self.instruction_rows, needed):
                try:
                    check(record, where)
                except FieldError as error:
                    raise InputError(error.render(columns)) from None
                yield where, record

        # Hashes only (~64 bytes per row): a million rows must not cost what keeping their ids would. A repeated
        # hash is confirmed, and its first line found, by reading the file again up to here (only on that path).
        seen: set[int] = set()
        count = 0
        for where, record in rows():
            if record.get("id") is not None:
                key = hash(str(record["id"]))
                if key in seen:
                    first = next((w for w, r in rows() if str(r.get("id")) == str(record["id"])), where)
                    if first != where:
                        raise InputError(f"{where}: duplicate id {record['id']!r} (first at "
                                         f"{_line_of(first)})")
                seen.add(key)
            count += 1
            yield record
        if count == 0:
            raise InputError(f"{path}: no records in the file (empty)")


def _line_of(where: str) -> str:
    """`file:12` → `line 12`; `file[3]` → `item 3`; `file:row 4` → `row 4`."""
    if where.endswith("]"):
        return "item " + where[where.rindex("[") + 1:-1]
    tail = where.rsplit(":", 1)[1]
    return tail if tail.startswith("row") else f"line {tail}"
