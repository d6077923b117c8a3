"""Support-ticket classification: ticket text → JSON {category, subcategory, urgency} from a fixed two-level taxonomy."""

from __future__ import annotations

import json

from data_prep.tasks.base import ChatExample, Record, Task
from data_prep.tasks.json_metrics import score_json_fields
from data_prep.tasks.ticket_classification.generator import TAXONOMY, URGENCIES, generate_tickets
from recipes.errors import InputError

FIELDS = ("category", "subcategory", "urgency")

SYSTEM_PROMPT = (
    'Classify the support ticket. Reply with JSON only: {"category": ..., "subcategory": ..., "urgency": ...}.\n'
    "Categories (subcategories): "
    + "; ".join(f"{category} ({', '.join(subs)})" for category, subs in TAXONOMY.items())
    + f".\nUrgency: {', '.join(URGENCIES)}."
)


class TicketClassification(Task):
    name = "ticket_classification"
    formatter_version = "2"
    required_fields = ("title", "description", "category", "subcategory", "urgency")
    headline_metrics = ("category", "subcategory", "urgency", "exact_match", "parse_rate")

    def generate(self, n: int, seed: int) -> list[Record]:
        return generate_tickets(n, seed)

    def check_record(self, record: Record, where: str) -> None:
        super().check_record(record, where)
        category = record["category"]
        if category not in TAXONOMY:
            raise InputError(f"{where}: field 'category' must be one of {'|'.join(TAXONOMY)} (got {category!r})")
        if record["subcategory"] not in TAXONOMY[category]:
            allowed = "|".join(TAXONOMY[category])
            raise InputError(
                f"{where}: field 'subcategory' must be one of {allowed} for category {category!r} "
                f"(got {record['subcategory']!r})"
            )
        if record["urgency"] not in URGENCIES:
            raise InputError(f"{where}: field 'urgency' must be one of {'|'.join(URGENCIES)} (got {record['urgency']!r})")

    def format(self, record: Record) -> ChatExample:
        header = f"Title: {record['title']}"
        if record.get("user") or record.get("date"):
            header += f"\nFrom: {record.get('user', 'unknown')} on {record.get('date', 'unknown date')}"
        answer = json.dumps({field: record[field] for field in FIELDS})
        return ChatExample(
            messages=[
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": f"{header}\n\n{record['description']}"},
            ],
            answer=answer,
        )

    def score(self, outputs: list[str], records: list[Record]) -> dict[str, float]:
        return score_json_fields(outputs, records, FIELDS)
