"""Medical QA, two tasks: free-text answers (ROUGE-L, BLEU) and multiple choice (stem + options → letter), the latter
scored by generation and by option log-likelihood, also during training at every `eval.every_steps`."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from multitune.data_prep.tasks.base import ChatExample, ChatTask, Record
from multitune.data_prep.tasks.medical_qa.generator import LETTERS, generate_items
from multitune.data_prep.tasks.text_metrics import text_scores
from multitune.data_prep.tokenize import IGNORE, tokenize_examples
from multitune.recipes.errors import InputError

if TYPE_CHECKING:  # torch is imported where it is used: prep's worker processes never load it (2 s of start-up)
    import torch

QA_SYSTEM = "You are a careful medical assistant. Answer the question in one or two sentences."
MC_SYSTEM = ("You are a careful medical assistant. "
             "Answer the multiple-choice question with the letter of the best option only.")
LETTER = re.compile(r"\b([A-E])\b")


class MedicalQA(ChatTask):
    name = "medical_qa"
    formatter_version = "2"
    accepts_context = True
    input_fields = ("question",)
    required_fields = ("question", "answer")
    optional_fields = ("context",)
    headline_metrics = ("rougeL", "bleu")

    def generate(self, n: int, seed: int) -> list[Record]:
        return generate_items(n, seed)

    def prompt_messages(self, record: Record) -> list[dict[str, str]]:
        question = with_context(record, record["question"])
        return [{"role": "system", "content": QA_SYSTEM}, {"role": "user", "content": question}]

    def format(self, record: Record) -> ChatExample:
        return ChatExample(self.prompt_messages(record), record["answer"])

    def score(self, outputs: list[str], records: list[Record]) -> dict[str, float]:
        return text_scores(outputs, [r["answer"] for r in records])


class MedicalMCQ(ChatTask):
    """Records: `question`, `options` (list, or {"A": ...} mapping), `answer_letter`. CSV: columns A, B, C, D (, E)."""

    name = "medical_mcq"
    formatter_version = "2"
    accepts_context = True
    input_fields = ("question",)
    required_fields = ("question", "answer_letter")
    optional_fields = ("options", "context", *LETTERS)
    headline_metrics = ("accuracy_loglik", "accuracy_generation", "answer_rate")

    def generate(self, n: int, seed: int) -> list[Record]:
        return generate_items(n, seed)

    def check_input(self, record: Record, where: str) -> None:
        super().check_input(record, where)
        if len(options_of(record)) < 2:
            raise InputError(f"{where}: field 'options' needs 2 to 5 options (a list, a mapping, or columns A..E)")

    def check_record(self, record: Record, where: str) -> None:
        self.check_input(record, where)
        super().check_record(record, where)
        letters = LETTERS[:len(options_of(record))]
        if str(record["answer_letter"]).strip().upper() not in letters:
            raise InputError(f"{where}: field 'answer_letter' must be one of {'|'.join(letters)} "
                             f"(got {record['answer_letter']!r})")

    def prompt_messages(self, record: Record) -> list[dict[str, str]]:
        lines = [record["question"], *(f"{letter}. {text}" for letter, text in options_of(record))]
        question = with_context(record, "\n".join(lines))
        return [{"role": "system", "content": MC_SYSTEM}, {"role": "user", "content": question}]

    def format(self, record: Record) -> ChatExample:
        return ChatExample(self.prompt_messages(record), str(record["answer_letter"]).strip().upper())

    def score(self, outputs: list[str], records: list[Record]) -> dict[str, float]:
        letters = [parse_letter(out) for out in outputs]
        n = max(len(records), 1)
        return {"accuracy_generation": sum(p == str(r["answer_letter"]).strip().upper()
                                           for p, r in zip(letters, records)) / n,
                "answer_rate": sum(p is not None for p in letters) / n}

    def parse_output(self, text: str) -> dict:
        letter = parse_letter(text)
        return {"valid": letter is not None, "letter": letter, "problems": [] if letter else ["no option letter"]}

    def model_metrics(self, model, tokenizer, records: list[Record], device) -> dict[str, float]:
        """accuracy_loglik: the option whose letter, as the answer turn, has the highest log-likelihood."""
        import torch

        was_training = model.training
        model.eval()
        correct = 0
        try:
            with torch.no_grad():
                for record in records:
                    messages = self.prompt_messages(record)
                    letters = [letter for letter, _ in options_of(record)]
                    scores = answer_log_likelihoods(model, tokenizer, messages, letters, device)
                    correct += letters[int(torch.argmax(scores))] == str(record["answer_letter"]).strip().upper()
        finally:
            model.train(was_training)
        return {"accuracy_loglik": correct / max(len(records), 1)}


def with_context(record: Record, question: str) -> str:
    """The question, after the record's reference passages when it has a `context` (a string or a list)."""
    context = record.get("context")
    if not context:
        return question
    passages = [context] if isinstance(context, str) else [str(p) for p in context]
    shown = "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, 1))
    return f"Reference passages:\n{shown}\n\nQuestion: {question}"


def options_of(record: Record) -> list[tuple[str, str]]:
    options = record.get("options")
    if isinstance(options, list):
        texts = [str(o) for o in options]
    elif isinstance(options, dict):
        texts = [str(options[k]) for k in LETTERS if k in options]
    else:
        texts = [str(record[k]) for k in LETTERS if str(record.get(k) or "").strip()]
    return list(zip(LETTERS, texts[:len(LETTERS)]))


def parse_letter(text: str) -> str | None:
    match = LETTER.search(text.strip()[:40])
    return match.group(1) if match else None


def answer_log_likelihoods(model, tokenizer, messages, answers: list[str], device) -> torch.Tensor:
    """Summed log-probability of each candidate answer turn (template end-of-turn included) after the prompt."""
    import torch

    batch = tokenize_examples(tokenizer, [ChatExample(messages, a) for a in answers], completion_only=True)
    width = max(len(ids) for ids in batch.input_ids)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in batch.input_ids], device=device)
    labels = torch.tensor([row + [IGNORE] * (width - len(row)) for row in batch.labels], device=device)
    mask = (torch.arange(width, device=device)[None, :] < torch.tensor([len(r) for r in batch.input_ids],
                                                                        device=device)[:, None]).long()
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logprobs * (targets != IGNORE)).sum(dim=1)
