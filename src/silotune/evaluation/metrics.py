"""Text metrics: ROUGE-L (through rouge-score, never re-implemented) and exact-match accuracy."""

from __future__ import annotations

from rouge_score import rouge_scorer


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure of predictions against references (stemmed, as is usual)."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(ref, pred)["rougeL"].fmeasure
        for pred, ref in zip(predictions, references, strict=True)
    ]
    return float(sum(scores) / len(scores))


def accuracy(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference (0.0 when there are none)."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    if not predictions:
        return 0.0
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(predictions)
