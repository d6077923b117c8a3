"""Support-ticket classification: ticket text → JSON {category, subcategory, urgency} from the team's own two-level
taxonomy (declared in the recipe, or collected from the training split; the synthetic generator brings its own)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable

from multitune.data_prep.readers import FieldError
from multitune.data_prep.tasks.base import ChatExample, ChatTask, Record
from multitune.data_prep.tasks.json_metrics import class_reports, parse_json_object, schema_problems, score_json_fields
from multitune.data_prep.tasks.ticket_classification.generator import TAXONOMY, URGENCIES, generate_tickets
from multitune.recipes.errors import InputError

FIELDS = ("category", "subcategory", "urgency")
INSTRUCTION = ('Classify the support ticket. '
               'Reply with JSON only: {"category": ..., "subcategory": ..., "urgency": ...}.')


class Taxonomy:
    """category → subcategories, and the urgency levels, in the order they are listed in the prompt. The same
    subcategory name may sit under several categories."""

    def __init__(self, categories: dict[str, list[str]], urgencies: list[str]):
        self.categories, self.urgencies = categories, urgencies

    @classmethod
    def from_json(cls, labels: dict, where: str = "data.task_options.labels") -> Taxonomy:
        """From `{category: {<category>: [<subcategory>, ...]}, urgency: [...]}`; InputError names a bad key."""
        unknown = set(labels) - {"category", "urgency"}
        if unknown:
            raise InputError(f"{where}.{sorted(unknown)[0]}: ticket_classification labels are 'category' "
                             "(a mapping category → subcategories) and 'urgency' (a list)")
        categories, urgencies = labels.get("category"), labels.get("urgency")
        if not isinstance(categories, dict) or not categories or not all(
                isinstance(subs, list) and subs for subs in categories.values()):
            raise InputError(f"{where}.category: must map each category to a non-empty list of its subcategories")
        if not isinstance(urgencies, list) or not urgencies:
            raise InputError(f"{where}.urgency: must be a non-empty list of urgency levels")
        return cls({str(c): [str(s) for s in subs] for c, subs in categories.items()}, [str(u) for u in urgencies])

    def to_json(self) -> dict:
        return {"category": self.categories, "urgency": self.urgencies}


class TicketClassification(ChatTask):
    name = "ticket_classification"
    formatter_version = "3"  # 3: labels from the data or recipe; JSON answers keep non-ASCII characters
    input_fields = ("title", "description")
    required_fields = ("title", "description", "category", "subcategory", "urgency")
    optional_fields = ("user", "date")
    headline_metrics = ("category", "subcategory", "urgency", "exact_match", "parse_rate")
    option_keys = frozenset({"labels", "system_prompt"})
    instruction_rows = True

    def __init__(self, taxonomy: Taxonomy | None = None, source: str = "generator", instruction: str = INSTRUCTION):
        """`source`: where the label sets come from: `generator` (the synthetic taxonomy, until data brings its
        own), `data` (collected from a training split) or `declared` (data.task_options.labels: rows must fit)."""
        self.taxonomy = taxonomy or Taxonomy({c: list(s) for c, s in TAXONOMY.items()}, list(URGENCIES))
        self.source, self.instruction = source, instruction
        self.declared = source == "declared"

    def _configured(self, options) -> TicketClassification:
        taxonomy = Taxonomy.from_json(options.labels) if options.labels is not None else None
        return TicketClassification(taxonomy, "declared" if taxonomy is not None else "generator",
                                    options.system_prompt or INSTRUCTION)

    def generate(self, n: int, seed: int) -> list[Record]:
        return generate_tickets(n, seed)

    # --- labels -------------------------------------------------------------------------------------------------------
    @property
    def labels(self) -> dict:
        return self.taxonomy.to_json()

    def needs_labels(self) -> bool:
        return self.source == "generator"

    def generator_labels(self) -> dict:
        return TicketClassification().labels

    def collect_labels(self, records: Iterable[Record]) -> dict:
        """Categories, their subcategories and urgencies as seen, each sorted (stable whatever the row order)."""
        categories: dict[str, set[str]] = {}
        urgencies: set[str] = set()
        for record in records:
            categories.setdefault(_text(record["category"]), set()).add(_text(record["subcategory"]))
            urgencies.add(_text(record["urgency"]))
        return Taxonomy({c: sorted(categories[c]) for c in sorted(categories)}, sorted(urgencies)).to_json()

    def with_labels(self, labels: dict | None) -> TicketClassification:
        if labels is None or self.declared:
            return self
        configured = copy.copy(self)  # a subclass stays itself
        configured.taxonomy, configured.source = Taxonomy.from_json(labels, "labels"), "data"
        return configured

    def unseen_labels(self, record: Record) -> list[tuple[str, str]]:
        unseen = []
        category = _text(record.get("category")) if record.get("category") is not None else None
        if category is not None and category not in self.taxonomy.categories:
            unseen.append(("category", category))
        elif category is not None and record.get("subcategory") is not None:
            sub = _text(record["subcategory"])
            if sub not in self.taxonomy.categories[category]:
                unseen.append(("subcategory", sub))
        if record.get("urgency") is not None and _text(record["urgency"]) not in self.taxonomy.urgencies:
            unseen.append(("urgency", _text(record["urgency"])))
        return unseen

    def check_record(self, record: Record, where: str) -> None:
        super().check_record(record, where)
        for field in FIELDS:
            if not isinstance(record[field], (str, int)) or isinstance(record[field], bool):
                raise FieldError(where, field, f"must be a text label (got {type(record[field]).__name__})")
        if not self.declared:
            return
        categories, category = self.taxonomy.categories, _text(record["category"])
        if category not in categories:
            raise FieldError(where, "category", f"must be one of {'|'.join(categories)} (got {category!r})")
        if _text(record["subcategory"]) not in categories[category]:
            raise FieldError(where, "subcategory", f"must be one of {'|'.join(categories[category])} for category "
                                                   f"{category!r} (got {_text(record['subcategory'])!r})")
        if _text(record["urgency"]) not in self.taxonomy.urgencies:
            raise FieldError(where, "urgency", f"must be one of {'|'.join(self.taxonomy.urgencies)} "
                                               f"(got {_text(record['urgency'])!r})")

    # --- prompts, answers, metrics -----------------------------------------------------------------------------------
    def system_prompt(self) -> str:
        return (f"{self.instruction}\nCategories (subcategories): "
                + "; ".join(f"{c} ({', '.join(subs)})" for c, subs in self.taxonomy.categories.items())
                + f".\nUrgency: {', '.join(self.taxonomy.urgencies)}.")

    def prompt_messages(self, record: Record) -> list[dict[str, str]]:
        header = f"Title: {record['title']}"
        if record.get("user") or record.get("date"):
            header += f"\nFrom: {record.get('user') or 'unknown'} on {record.get('date') or 'unknown date'}"
        return [{"role": "system", "content": self.system_prompt()},
                {"role": "user", "content": f"{header}\n\n{record['description']}"}]

    def format(self, record: Record) -> ChatExample:
        # ensure_ascii=False: "Geräte" as written, not "Ger\u00e4te" (more tokens, and never the ticket's spelling).
        answer = json.dumps({field: _text(record[field]) for field in FIELDS}, ensure_ascii=False)
        return ChatExample(self.prompt_messages(record), answer)

    def score(self, outputs: list[str], records: list[Record]) -> dict[str, float]:
        metrics = score_json_fields(outputs, records, FIELDS)
        for field, report in self.class_reports(outputs, records).items():
            metrics[f"{field}_f1"] = report.macro_f1
        return metrics

    def class_reports(self, outputs: list[str], records: list[Record]) -> dict:
        categories = self.taxonomy.categories
        known = {"category": list(categories), "urgency": self.taxonomy.urgencies,
                 "subcategory": list(dict.fromkeys(sub for subs in categories.values() for sub in subs))}
        return class_reports(outputs, records, FIELDS, known)

    def parse_output(self, text: str) -> dict:
        fields = parse_json_object(text)
        problems = schema_problems(fields, FIELDS)
        if not problems:
            problems = [f"{field} {value!r} is not a trained label" for field, value in self.unseen_labels(fields)]
        return {"valid": not problems, "fields": fields, "problems": problems}


def _text(value) -> str:
    return value if isinstance(value, str) else str(value)
