"""Scoring for tasks whose answer is a JSON object: parse rate, schema validity, per-field accuracy and macro F1."""

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


_MISSING = "\0missing"


def _normalise(value: Any) -> str:
    return " ".join(str(value).lower().split()) if value is not None else _MISSING


def schema_problems(value: dict[str, Any] | None, fields: tuple[str, ...]) -> list[str]:
    """Why `value` is not a valid answer object: missing, extra or empty keys (empty list = valid)."""
    if value is None:
        return ["no JSON object in the output"]
    problems = [f"missing key '{field}'" for field in fields if field not in value]
    problems += [f"unexpected key '{key}'" for key in value if key not in fields]
    problems += [f"key '{field}' is not a non-empty string" for field in fields
                 if field in value and not (isinstance(value[field], str) and value[field].strip())]
    return problems


def macro_f1(predictions: list[Any], references: list[Any]) -> float:
    """Unweighted mean of per-class F1 over every class seen in references or predictions (as sklearn's macro)."""
    predicted = [_normalise(p) for p in predictions]
    expected = [_normalise(r) for r in references]
    classes = (set(predicted) | set(expected)) - {_MISSING}
    if not classes:
        return 0.0
    total = 0.0
    for label in classes:
        tp = sum(p == label and r == label for p, r in zip(predicted, expected))
        fp = sum(p == label and r != label for p, r in zip(predicted, expected))
        fn = sum(p != label and r == label for p, r in zip(predicted, expected))
        total += 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return total / len(classes)


def score_extraction(outputs: list[str], references: list[dict[str, Any]], fields: tuple[str, ...],
                     f1_fields: tuple[str, ...]) -> dict[str, float]:
    """score_json_fields plus `schema_valid` (share of outputs that are exactly the answer schema) and
    `<field>_f1` (macro F1) for the categorical `f1_fields`."""
    metrics = score_json_fields(outputs, references, fields)
    parsed = [parse_json_object(text) for text in outputs]
    metrics["schema_valid"] = sum(not schema_problems(p, fields) for p in parsed) / max(len(outputs), 1)
    for field in f1_fields:
        metrics[f"{field}_f1"] = macro_f1([p.get(field) if p else None for p in parsed],
                                          [r[field] for r in references])
    return metrics
