"""LLM-as-judge: a rubric prompt (context, reference answer, candidate answer) sent to an endpoint; the 1–5 score
parsed from whatever the judge replies; the mean score and the parse rate become metric rows."""

from __future__ import annotations

import json
import re

from multitune.data_prep.tasks.base import ChatTask, Record
from multitune.trainer.endpoint import EndpointClient

RUBRIC = """You grade answers against a reference answer written by an expert.
Score the candidate answer from 1 to 5:
5 = says what the reference says (same facts, cause and action); wording may differ.
4 = mostly right: the key point matches, a minor detail is missing or slightly off.
3 = partly right: some key points match, others are missing or wrong.
2 = mostly wrong: at most a minor point matches the reference.
1 = wrong, off-topic, empty or unreadable.
Judge only correctness against the reference, not style or length.
Reply with JSON only: {"score": <1-5>}"""

LABELLED = re.compile(r"\b(?:score|rating|grade)\b[\"']?\s*(?:[:=]|of|is)?\s*[\"']?([1-5])(?!\d|\.\d)", re.IGNORECASE)
# A lone integer 1-5: not part of a longer number or a decimal ("10", "4.5", "2024" do not count).
BARE = re.compile(r"(?<![\d.])([1-5])(?!\d|\.\d)")


def parse_score(reply: str) -> int | None:
    """The judge's 1-5 score: a JSON {"score": n}, else a labelled "score: n", else the first lone integer 1-5."""
    text = reply.strip()
    for candidate in re.findall(r"\{[^{}]*\}", text):
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        score = value.get("score") if isinstance(value, dict) else None
        if isinstance(score, (int, str)) and str(score).strip() in {"1", "2", "3", "4", "5"}:
            return int(score)
    match = LABELLED.search(text) or BARE.search(text)
    return int(match.group(1)) if match else None


def judge_messages(context: list[dict[str, str]], reference: str, candidate: str) -> list[dict[str, str]]:
    shown = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in context)
    return [{"role": "system", "content": RUBRIC},
            {"role": "user", "content": f"## Conversation the answer replies to\n{shown}\n\n"
                                        f"## Reference answer\n{reference}\n\n## Candidate answer\n{candidate}"}]


class Judge:
    """Grades generations with `client`; the context and reference come from the task's own formatter."""

    def __init__(self, client: EndpointClient, max_tokens: int = 64):
        self.client, self.max_tokens = client, max_tokens

    def grade(self, task: ChatTask, outputs: list[str], records: list[Record]) -> tuple[dict[str, float], list[dict]]:
        """(metrics, per-sample {score, reply}): `judge_score` is the mean over parsed replies, `judge_parse_rate`
        the share of replies that held a score (unparsable ones are counted there, not guessed)."""
        examples = [task.format(record) for record in records]
        replies = self.client.chat_many([judge_messages(ex.messages, ex.answer, out)
                                         for ex, out in zip(examples, outputs)], self.max_tokens)
        scores = [parse_score(reply) for reply in replies]
        parsed = [s for s in scores if s is not None]
        metrics = {"judge_parse_rate": len(parsed) / max(len(scores), 1)}
        if parsed:
            metrics["judge_score"] = sum(parsed) / len(parsed)
        return metrics, [{"score": s, "reply": r} for s, r in zip(scores, replies)]
