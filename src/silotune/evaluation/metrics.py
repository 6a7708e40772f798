"""Text metrics: ROUGE (rouge-score), BLEU-4 (NLTK), exact-match accuracy; none re-implemented."""

from __future__ import annotations

from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
from rouge_score import rouge_scorer


def rouge_scores(
    predictions: list[str], references: list[str], kind: str = "rougeL"
) -> list[float]:
    """Per-item ROUGE F-measure (`rougeL`, `rouge1`, ...) against references (stemmed)."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    scorer = rouge_scorer.RougeScorer([kind], use_stemmer=True)
    return [
        float(scorer.score(ref, pred)[kind].fmeasure)
        for pred, ref in zip(predictions, references, strict=True)
    ]


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure of predictions against references (stemmed, as is usual)."""
    scores = rouge_scores(predictions, references)
    return float(sum(scores) / len(scores)) if scores else 0.0


def bleu4(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 (0..1) of whitespace-tokenised texts, through NLTK, with method-1 smoothing
    so that short corpora without a 4-gram match do not collapse to exactly 0."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    if not predictions:
        return 0.0
    hyps = [p.split() for p in predictions]
    refs = [[r.split()] for r in references]
    smooth = SmoothingFunction().method1
    return float(corpus_bleu(refs, hyps, smoothing_function=smooth))


def accuracy(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference (0.0 when there are none)."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    if not predictions:
        return 0.0
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(predictions)
