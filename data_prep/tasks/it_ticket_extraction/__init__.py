"""IT incident field extraction: ticket text (short/full description, caller, opened_at) → JSON of routing fields."""

from __future__ import annotations

import json

from data_prep.tasks.base import ChatExample, Record, Task
from data_prep.tasks.it_ticket_extraction.generator import generate_incidents
from data_prep.tasks.json_metrics import parse_json_object, schema_problems, score_extraction

FIELDS = ("category", "subcategory", "assignment_group", "priority", "impact", "affected_service",
          "configuration_item")
# Fields with a closed label set get macro F1; the CI is a free-form name, exact match only.
F1_FIELDS = FIELDS[:-1]

SYSTEM_PROMPT = (
    "You are an IT service desk triage assistant. Read the incident and reply with one JSON object with the keys "
    + ", ".join(f'"{f}"' for f in FIELDS)
    + ". Priority follows the ITIL impact x urgency matrix; configuration_item is the affected host or device "
    "name as written in the ticket. Reply with the JSON only."
)


class ITTicketExtraction(Task):
    name = "it_ticket_extraction"
    formatter_version = "1"
    input_fields = ("short_description", "description")
    required_fields = input_fields + FIELDS
    headline_metrics = ("parse_rate", "schema_valid", "exact_match", "category", "assignment_group", "priority",
                        "impact", "configuration_item", "priority_f1")

    def generate(self, n: int, seed: int) -> list[Record]:
        return generate_incidents(n, seed)

    def prompt_messages(self, record: Record) -> list[dict[str, str]]:
        header = [f"Short description: {record['short_description']}"]
        header += [f"{label}: {record[key]}" for key, label in (("caller", "Caller"), ("opened_at", "Opened"))
                   if record.get(key)]
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": "\n".join(header) + f"\n\n{record['description']}"}]

    def format(self, record: Record) -> ChatExample:
        return ChatExample(self.prompt_messages(record), json.dumps({field: record[field] for field in FIELDS}))

    def score(self, outputs: list[str], records: list[Record]) -> dict[str, float]:
        return score_extraction(outputs, records, FIELDS, F1_FIELDS)

    def parse_output(self, text: str) -> dict:
        fields = parse_json_object(text)
        problems = schema_problems(fields, FIELDS)
        return {"valid": not problems, "fields": fields, "problems": problems}
