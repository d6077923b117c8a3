"""Scoring for tasks whose answer is a JSON object: parse rate, schema validity, per-field accuracy and macro F1."""

from __future__ import annotations

import json
from dataclasses import dataclass
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


def score_json_fields(outputs: list[str], references: list[dict[str, Any]],
                      fields: tuple[str, ...]) -> dict[str, float]:
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


@dataclass(frozen=True)
class ClassReport:
    """One closed-set field scored per class. `classes`: every label in the references or the predictions (as first
    spelt); `precision`/`recall`/`f1`/`support`: per class, in that order; `confusion[i][j]`: rows whose reference is
    classes[i] and prediction classes[j], with a last column for rows without an answer (unparsable output or a
    missing key). Labels compare case- and space-insensitively, as the accuracy does."""

    field: str
    classes: list[str]
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    confusion: list[list[int]]
    accuracy: float
    macro_f1: float


NO_ANSWER = "(no answer)"
# A field with at most this many distinct reference values (and at most one per two rows) is a closed set: scored
# per class. A host name or free text has about one value per row.
CLOSED_SET_MAX = 50


def is_closed_set(distinct: int, rows: int) -> bool:
    """Whether a field with `distinct` values over `rows` rows is a closed set (see CLOSED_SET_MAX)."""
    return distinct <= min(CLOSED_SET_MAX, rows // 2)


def closed_set_fields(references: list[dict[str, Any]], fields: tuple[str, ...]) -> tuple[str, ...]:
    """The `fields` whose reference values form a closed set."""
    return tuple(f for f in fields
                 if is_closed_set(len({_normalise(r.get(f)) for r in references if r}), len(references)))


def class_report(field: str, predictions: list[Any], references: list[Any], known: list[str] = ()) -> ClassReport:
    """Per-class precision, recall, F1 and support plus the confusion matrix of one field (sklearn.metrics).
    `predictions` hold None where the output had no value for the field. `known`: the field's trained labels, listed
    first and in that order even when absent from this eval (rows of zeros); other labels follow, sorted. Macro-F1 is
    the unweighted mean over the labels seen in references or predictions, as sklearn's macro average."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    expected = [_normalise(r) for r in references]
    predicted = [_normalise(p) for p in predictions]
    spelling: dict[str, str] = {_normalise(label): label for label in known}
    for key, value in [*zip(expected, references), *zip(predicted, predictions)]:
        if key != _MISSING:
            spelling.setdefault(key, " ".join(str(value).split()))
    known_keys = list(dict.fromkeys(_normalise(label) for label in known))
    keys = known_keys + sorted((k for k in spelling if k not in known_keys), key=lambda k: spelling[k].casefold())
    if not keys:
        return ClassReport(field, [], [], [], [], [], [], 0.0, 0.0)
    precision, recall, f1, support = precision_recall_fscore_support(expected, predicted, labels=keys,
                                                                     zero_division=0)
    matrix = confusion_matrix(expected, predicted, labels=[*keys, _MISSING])[:-1]
    present = set(expected) | (set(predicted) - {_MISSING})
    scored = [score for key, score in zip(keys, f1) if key in present]
    return ClassReport(
        field, [spelling[k] for k in keys], [float(x) for x in precision], [float(x) for x in recall],
        [float(x) for x in f1], [int(x) for x in support], matrix.tolist(),
        accuracy=sum(p == r for p, r in zip(predicted, expected)) / max(len(expected), 1),
        macro_f1=float(sum(scored) / len(scored)) if scored else 0.0)


def class_reports(outputs: list[str], references: list[dict[str, Any]], fields: tuple[str, ...],
                  known: dict[str, list[str]] | None = None) -> dict[str, ClassReport]:
    """`class_report` of each of `fields` for JSON-object outputs against reference records; `known`: trained
    labels per field."""
    parsed = [parse_json_object(text) for text in outputs]
    return {field: class_report(field, [p.get(field) if p else None for p in parsed], [r[field] for r in references],
                                (known or {}).get(field, ())) for field in fields}


def macro_f1(predictions: list[Any], references: list[Any]) -> float:
    """Unweighted mean of per-class F1 over every class seen in references or predictions (sklearn's macro)."""
    return class_report("", predictions, references).macro_f1


def score_extraction(outputs: list[str], references: list[dict[str, Any]], fields: tuple[str, ...],
                     f1_fields: tuple[str, ...]) -> dict[str, float]:
    """score_json_fields plus `schema_valid` (share of outputs that are exactly the answer schema), `<field>_f1`
    (macro F1) for the closed-set `f1_fields`, and `<field>_exact` (verbatim match) for the free-form others, whose
    `<field>` accuracy is the normalised (case- and space-insensitive) match."""
    metrics = score_json_fields(outputs, references, fields)
    parsed = [parse_json_object(text) for text in outputs]
    metrics["schema_valid"] = sum(not schema_problems(p, fields) for p in parsed) / max(len(outputs), 1)
    for field in fields:
        predictions = [p.get(field) if p else None for p in parsed]
        if field in f1_fields:
            metrics[f"{field}_f1"] = class_report(field, predictions, [r[field] for r in references]).macro_f1
        else:
            metrics[f"{field}_exact"] = sum(p is not None and str(p) == str(r[field])
                                            for p, r in zip(predictions, references)) / max(len(outputs), 1)
    return metrics
