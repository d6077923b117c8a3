"""IT incident field extraction: ticket text (short/full description, caller, opened_at) → JSON of the team's routing
fields (default: seven ServiceNow-style fields); closed-set fields are scored per class, free-form ones by match."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable

from multitune.data_prep.readers import FieldError
from multitune.data_prep.tasks.base import ChatExample, ChatTask, Record
from multitune.data_prep.tasks.it_ticket_extraction.generator import generate_incidents
from multitune.data_prep.tasks.json_metrics import (
    CLOSED_SET_MAX,
    class_reports,
    closed_set_fields,
    is_closed_set,
    parse_json_object,
    schema_problems,
    score_extraction,
)
from multitune.recipes.errors import InputError

FIELDS = ("category", "subcategory", "assignment_group", "priority", "impact", "affected_service",
          "configuration_item")

DEFAULT_PROMPT = (
    "You are an IT service desk triage assistant. Read the incident and reply with one JSON object with the keys "
    + ", ".join(f'"{f}"' for f in FIELDS)
    + ". Priority follows the ITIL impact x urgency matrix; configuration_item is the affected host or device "
    "name as written in the ticket. Reply with the JSON only."
)


class ITTicketExtraction(ChatTask):
    name = "it_ticket_extraction"
    formatter_version = "2"  # 2: configurable fields; JSON answers keep non-ASCII characters
    input_fields = ("description",)
    optional_fields = ("short_description", "caller", "opened_at")
    option_keys = frozenset({"fields", "closed_fields", "labels", "system_prompt"})
    instruction_rows = True

    def __init__(self, fields: tuple[str, ...] = FIELDS, closed: tuple[str, ...] | None = None,
                 values: dict[str, list[str]] | None = None, declared: bool = False,
                 instruction: str | None = None):
        self.fields, self.closed, self.values, self.declared = fields, closed, values, declared
        self.instruction = instruction
        self.required_fields = (*self.input_fields, *fields)
        self.headline_metrics = (("parse_rate", "schema_valid", "exact_match", "category", "assignment_group",
                                  "priority", "impact", "configuration_item", "priority_f1") if fields == FIELDS
                                 else ("parse_rate", "schema_valid", "exact_match", *fields))

    def _configured(self, options) -> ITTicketExtraction:
        fields = tuple(options.fields) or FIELDS
        if len(set(fields)) != len(fields):
            raise InputError("data.task_options.fields: a field is listed twice")
        labels = options.labels
        if labels is not None:
            for field, values in labels.items():
                if field not in fields:
                    raise InputError(f"data.task_options.labels.{field}: not one of the answer fields "
                                     f"({', '.join(fields)})")
                if not isinstance(values, list) or not values:
                    raise InputError(f"data.task_options.labels.{field}: must be a non-empty list of values")
        for field in options.closed_fields or ():
            if field not in fields:
                raise InputError(f"data.task_options.closed_fields: '{field}' is not one of the answer fields "
                                 f"({', '.join(fields)})")
        closed = None
        if options.closed_fields is not None or labels is not None:
            closed = tuple(f for f in fields if f in (options.closed_fields or ()) or f in (labels or {}))
        values = {f: [str(v) for v in labels[f]] for f in labels} if labels is not None else None
        # Declared: closed fields and their values are given, so nothing is collected from the data.
        declared = options.closed_fields is not None and all(f in (labels or {}) for f in closed)
        return ITTicketExtraction(fields, closed, values, declared and bool(values), options.system_prompt)

    def generate(self, n: int, seed: int) -> list[Record]:
        return generate_incidents(n, seed)

    # --- labels -------------------------------------------------------------------------------------------------------
    @property
    def labels(self) -> dict | None:
        if self.closed is None:
            return None
        return {"closed_fields": list(self.closed), "values": self.values or {}}

    def needs_labels(self) -> bool:
        return not self.declared

    def collect_labels(self, records: Iterable[Record]) -> dict:
        seen: dict[str, set[str]] = {field: set() for field in self.fields}
        rows = 0
        for record in records:
            rows += 1
            for field in self.fields:
                if len(seen[field]) <= CLOSED_SET_MAX:  # past it the field is free-form: stop collecting
                    seen[field].add(_text(record[field]))
        if self.closed is not None:
            closed = self.closed
        else:
            closed = tuple(f for f in self.fields if is_closed_set(len(seen[f]), rows))
        values = {f: (self.values or {}).get(f) or sorted(seen[f]) for f in closed}
        return {"closed_fields": list(closed), "values": values}

    def with_labels(self, labels: dict | None) -> ITTicketExtraction:
        if labels is None or self.declared:
            return self
        configured = copy.copy(self)  # a subclass stays itself
        configured.closed, configured.values = tuple(labels["closed_fields"]), labels["values"]
        return configured

    def unseen_labels(self, record: Record) -> list[tuple[str, str]]:
        return [(field, _text(record[field])) for field in self.closed or ()
                if record.get(field) is not None and _text(record[field]) not in (self.values or {}).get(field, ())]

    def check_record(self, record: Record, where: str) -> None:
        super().check_record(record, where)
        if not self.declared:
            return
        for field, value in self.unseen_labels(record):
            raise FieldError(where, field, f"must be one of {'|'.join(self.values[field])} (got {value!r})")

    # --- prompts, answers, metrics -----------------------------------------------------------------------------------
    def system_prompt(self) -> str:
        keys = ", ".join(f'"{f}"' for f in self.fields)
        if self.instruction:
            return f"{self.instruction}\nReply with one JSON object with the keys {keys}."
        if self.fields == FIELDS:
            return DEFAULT_PROMPT
        return (f"You are an IT service desk triage assistant. Read the incident and reply with one JSON object with "
                f"the keys {keys}. Reply with the JSON only.")

    def prompt_messages(self, record: Record) -> list[dict[str, str]]:
        header = [f"{label}: {record[key]}" for key, label in (("short_description", "Short description"),
                                                               ("caller", "Caller"), ("opened_at", "Opened"))
                  if record.get(key)]
        text = "\n".join(header) + f"\n\n{record['description']}" if header else str(record["description"])
        return [{"role": "system", "content": self.system_prompt()}, {"role": "user", "content": text}]

    def format(self, record: Record) -> ChatExample:
        answer = json.dumps({field: _text(record[field]) for field in self.fields}, ensure_ascii=False)
        return ChatExample(self.prompt_messages(record), answer)

    def score(self, outputs: list[str], records: list[Record]) -> dict[str, float]:
        return score_extraction(outputs, records, self.fields, self._closed_fields(records))

    def class_reports(self, outputs: list[str], records: list[Record]) -> dict:
        return class_reports(outputs, records, self._closed_fields(records), self.values)

    def _closed_fields(self, records: list[Record]) -> tuple[str, ...]:
        if self.closed is not None:
            return self.closed
        if self.fields == FIELDS:  # the synthetic schema: every field but the host name is a closed set
            return FIELDS[:-1]
        return closed_set_fields(records, self.fields)

    def parse_output(self, text: str) -> dict:
        fields = parse_json_object(text)
        problems = schema_problems(fields, self.fields)
        return {"valid": not problems, "fields": fields, "problems": problems}


def _text(value) -> str:
    return value if isinstance(value, str) else str(value)
