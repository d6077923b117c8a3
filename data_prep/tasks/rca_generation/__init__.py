"""Root-cause analysis: incident description (+ optional symptoms and logs) → root cause line and resolution text."""

from __future__ import annotations

import re

from multitune.data_prep.tasks.base import ChatExample, ChatTask, Record
from multitune.data_prep.tasks.rca_generation.generator import generate_incidents
from multitune.data_prep.tasks.text_metrics import text_scores

SYSTEM_PROMPT = ("You are a site reliability engineer writing the root-cause analysis of an incident. Start with "
                 "'Root cause: <cause>' on its own line when you can name it, then 'Resolution:' and what was done.")
CAUSE_LINE = re.compile(r"^\s*root cause:\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


class RCAGeneration(ChatTask):
    name = "rca_generation"
    formatter_version = "1"
    input_fields = ("description",)
    optional_fields = ("title", "symptoms", "logs", "cause")
    required_fields = ("description", "resolution")  # `cause` is optional: exact-cause accuracy where present
    headline_metrics = ("rougeL", "bleu", "cause_accuracy")

    def generate(self, n: int, seed: int) -> list[Record]:
        return generate_incidents(n, seed)

    def prompt_messages(self, record: Record) -> list[dict[str, str]]:
        parts = [f"Incident: {record['title']}"] if record.get("title") else []
        parts.append(record["description"])
        if record.get("symptoms"):
            parts.append(f"Symptoms: {record['symptoms']}")
        if record.get("logs"):
            parts.append(f"Logs:\n{record['logs']}")
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n\n".join(parts)}]

    def format(self, record: Record) -> ChatExample:
        return ChatExample(self.prompt_messages(record), reference_text(record))

    def score(self, outputs: list[str], records: list[Record]) -> dict[str, float]:
        metrics = text_scores(outputs, [reference_text(r) for r in records])
        labelled = [(out, r["cause"]) for out, r in zip(outputs, records) if r.get("cause")]
        if labelled:
            metrics["cause_accuracy"] = sum(_same(parse_cause(out), cause) for out, cause in labelled) / len(labelled)
        return metrics

    def parse_output(self, text: str) -> dict:
        return {"valid": bool(text.strip()), "cause": parse_cause(text), "answer": text,
                "problems": [] if text.strip() else ["empty output"]}


def reference_text(record: Record) -> str:
    resolution = f"Resolution: {record['resolution']}"
    return f"Root cause: {record['cause']}\n{resolution}" if record.get("cause") else resolution


def parse_cause(text: str) -> str | None:
    match = CAUSE_LINE.search(text)
    return match.group(1).rstrip(".") if match else None


def _same(predicted: str | None, label: str) -> bool:
    return predicted is not None and " ".join(predicted.lower().split()) == " ".join(label.lower().split())
