"""Your own task without code: rows of chat `messages` or `prompt`/`completion`; JSON answers are scored per field
(data.task_options.json_fields), free text by ROUGE-L and BLEU."""

from __future__ import annotations

import json
import random

from multitune.data_prep.tasks.base import ChatExample, ChatTask, Record
from multitune.data_prep.tasks.json_metrics import (
    class_reports,
    closed_set_fields,
    parse_json_object,
    schema_problems,
    score_json_fields,
)
from multitune.data_prep.tasks.text_metrics import text_scores
from multitune.recipes.errors import InputError
from multitune.recipes.schema import TaskOptions


class ChatJsonl(ChatTask):
    name = "chat_jsonl"
    formatter_version = "1"
    option_keys = frozenset({"messages_field", "prompt_field", "completion_field", "system_prompt", "json_fields"})

    def __init__(self, options: TaskOptions | None = None):
        self.options = options = options if options is not None else TaskOptions()
        fields = tuple(options.json_fields)
        self.headline_metrics = ("parse_rate", "exact_match", *fields) if fields else ("rougeL", "bleu")

    def _configured(self, options: TaskOptions) -> ChatJsonl:
        return ChatJsonl(options)

    def known_fields(self) -> tuple[str, ...]:
        o = self.options
        return (o.messages_field, o.prompt_field, o.completion_field, "id")

    def system_prompt(self) -> str | None:
        return self.options.system_prompt

    def generate(self, n: int, seed: int) -> list[Record]:
        """A demo dataset (order e-mails → JSON) in prompt/completion form, for the debug recipe and tests."""
        return generate_orders(n, seed)

    def check_input(self, record: Record, where: str) -> None:
        self._split(record, where, need_answer=False)

    def check_record(self, record: Record, where: str) -> None:
        _, answer = self._split(record, where, need_answer=True)
        if self.options.json_fields:
            problems = schema_problems(_as_strings(parse_json_object(answer)), tuple(self.options.json_fields))
            problems = [p for p in problems if not p.startswith("unexpected")]
            if problems:
                raise InputError(f"{where}: the answer is not a JSON object with data.task_options.json_fields "
                                 f"({problems[0]})")

    def prompt_messages(self, record: Record) -> list[dict[str, str]]:
        return self._split(record, "row", need_answer=False)[0]

    def format(self, record: Record) -> ChatExample:
        messages, answer = self._split(record, "row", need_answer=True)
        return ChatExample(messages, answer)

    def score(self, outputs: list[str], records: list[Record]) -> dict[str, float]:
        answers = [self._split(r, "row", need_answer=True)[1] for r in records]
        fields = tuple(self.options.json_fields)
        if fields:
            references = [_as_strings(parse_json_object(a)) for a in answers]
            metrics = score_json_fields(outputs, references, fields)
            for field, report in class_reports(outputs, references, closed_set_fields(references, fields)).items():
                metrics[f"{field}_f1"] = report.macro_f1
            return metrics
        return text_scores(outputs, answers)

    def class_reports(self, outputs: list[str], records: list[Record]) -> dict:
        fields = tuple(self.options.json_fields)
        references = [_as_strings(parse_json_object(self._split(r, "row", need_answer=True)[1])) for r in records]
        return class_reports(outputs, references, closed_set_fields(references, fields)) if fields else {}

    def parse_output(self, text: str) -> dict:
        fields = tuple(self.options.json_fields)
        if not fields:
            return super().parse_output(text)
        parsed = parse_json_object(text)
        problems = [p for p in schema_problems(_as_strings(parsed), fields) if not p.startswith("unexpected")]
        return {"valid": not problems, "fields": parsed, "problems": problems}

    def _split(self, record: Record, where: str, need_answer: bool) -> tuple[list[dict[str, str]], str]:
        """(prompt messages, answer) from either row form; errors name the row and the field."""
        o = self.options
        if o.messages_field in record:
            messages = record[o.messages_field]
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise InputError(f"{where}: field '{o.messages_field}' must be a list of {{role, content}} objects")
            answer = ""
            if need_answer:
                if not messages or messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
                    raise InputError(f"{where}: the last message in '{o.messages_field}' must be a non-empty "
                                     "assistant turn (the answer)")
                messages, answer = messages[:-1], messages[-1]["content"]
            elif messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            if not any(m["role"] == "user" for m in messages):
                raise InputError(f"{where}: '{o.messages_field}' has no user turn")
        else:
            prompt = record.get(o.prompt_field)
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError(f"{where}: missing field '{o.messages_field}' or '{o.prompt_field}'")
            messages = [{"role": "user", "content": prompt}]
            answer = record.get(o.completion_field)
            if need_answer and (not isinstance(answer, str) or not answer.strip()):
                raise InputError(f"{where}: missing field '{o.completion_field}'")
        if o.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": o.system_prompt}, *messages]
        return messages, answer or ""


def _as_strings(value: dict | None) -> dict | None:
    """JSON answers may hold numbers or booleans; scoring compares their text."""
    return None if value is None else {k: v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}


PRODUCTS = ["ergonomic chair", "standing desk", "USB-C dock", "27-inch monitor", "noise-cancelling headset",
            "mechanical keyboard", "webcam", "laptop stand"]
CITIES = ["Berlin", "Lyon", "Porto", "Leeds", "Gdansk", "Turin", "Ghent", "Uppsala", "Bilbao", "Graz"]
PHRASES = ["Please send {q} x {p} to our {c} office.", "We need {q} {p}s delivered in {c}.",
           "Order: {p}, quantity {q}, ship to {c}.", "Could you ship {q} units of the {p} to {c}?",
           "Hi, our team in {c} would like {q} {p}s.", "Requesting {q} pcs {p} for the {c} site, thanks."]


def generate_orders(n: int, seed: int) -> list[Record]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        product, city, quantity = rng.choice(PRODUCTS), rng.choice(CITIES), rng.randint(1, 40)
        text = rng.choice(PHRASES).format(q=quantity, p=product, c=city)
        rows.append({"prompt": f"Extract product, quantity and city as JSON.\n\n{text}",
                     "completion": json.dumps({"product": product, "quantity": quantity, "city": city},
                                              ensure_ascii=False)})
    return rows
