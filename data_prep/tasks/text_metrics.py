"""Scoring for free-text answers: ROUGE-L (rouge-score) and corpus BLEU (sacrebleu), both on a 0–100 scale."""

from __future__ import annotations


def rouge_l(outputs: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure x 100 (rouge-score's tokenizer: lowercased alphanumeric words, Porter stemming)."""
    from rouge_score import rouge_scorer

    _same_length(outputs, references)
    if not outputs:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total = sum(scorer.score(ref, out)["rougeL"].fmeasure for out, ref in zip(outputs, references))
    return 100.0 * total / len(outputs)


def bleu(outputs: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenizer, exponential smoothing), one reference per output."""
    import sacrebleu

    _same_length(outputs, references)
    if not outputs:
        return 0.0
    return float(sacrebleu.corpus_bleu(outputs, [references]).score)


def text_scores(outputs: list[str], references: list[str]) -> dict[str, float]:
    return {"rougeL": rouge_l(outputs, references), "bleu": bleu(outputs, references)}


def _same_length(outputs: list[str], references: list[str]) -> None:
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs for {len(references)} references")
