"""Scoring for tasks whose answer is a JSON object: parse rate, per-field accuracy, exact match."""

from __future__ import annotations

import json
from typing import Any


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in `text` (models often wrap it in prose or code fences), or None."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        return value if isinstance(value, dict) else None
    return None


def score_json_fields(outputs: list[str], references: list[dict[str, Any]], fields: tuple[str, ...]) -> dict[str, float]:
    """Unparsable outputs count as wrong on every field; values compare case- and space-insensitively."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs for {len(references)} references")
    n = max(len(outputs), 1)
    parsed = [parse_json_object(text) for text in outputs]
    correct = {field: 0 for field in fields}
    exact = 0
    for prediction, reference in zip(parsed, references):
        if prediction is None:
            continue
        hits = [_normalise(prediction.get(field)) == _normalise(reference[field]) for field in fields]
        for field, hit in zip(fields, hits):
            correct[field] += hit
        exact += all(hits)
    metrics = {field: correct[field] / n for field in fields}
    metrics["exact_match"] = exact / n
    metrics["parse_rate"] = sum(p is not None for p in parsed) / n
    return metrics


def _normalise(value: Any) -> str:
    return " ".join(str(value).lower().split()) if value is not None else "\0missing"
