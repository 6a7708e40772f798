"""What the self-generator wrote, measured per client and round.

Two kinds of figures, kept apart because only one may leave the client:

    kept synthetic examples ──▶ distinct-1/2, mean lengths, judge score ──▶ round metrics (sent)
    kept synthetic examples + local records ──▶ nearest-record ROUGE-L ──▶ client's disk (0600)

The first are functions of the synthetic data alone, so under `synthetic.dp` they are
post-processing; the nearest-record ROUGE-L reads the records, so it never goes to the server.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rouge_score import rouge_scorer

from silotune.data.private import write_private
from silotune.run_folder import client_synthetic_file

if TYPE_CHECKING:
    from silotune.evaluation.judge import Judge, Verdict

Record = Mapping[str, str]
# Every client reports all of them every round (Flower needs the same keys from each reply).
QUALITY_KEYS = (
    "synthetic_distinct_1",
    "synthetic_distinct_2",
    "synthetic_instruction_words",
    "synthetic_response_words",
    "synthetic_judge_score",
    "synthetic_judged",
)
NEAREST = "nearest_rouge_l"


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of `texts` (lower-cased words, none across texts)."""
    grams = [
        tuple(words[i : i + n])
        for words in (text.lower().split() for text in texts)
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def quality_metrics(kept: Sequence[Record], judge: RatedJudge | None = None) -> dict[str, float]:
    """The round's sendable figures (0.0 when nothing was kept); `judge`: the judge filter that
    rated them, if it ran (it is not asked again)."""
    texts = [r["instruction"] for r in kept] + [r["output"] for r in kept]
    rated = judge.ratings if judge else {}
    scores = [rated[k] for k in ((r["instruction"], r["output"]) for r in kept) if k in rated]
    return {
        "synthetic_distinct_1": distinct_n(texts, 1),
        "synthetic_distinct_2": distinct_n(texts, 2),
        "synthetic_instruction_words": _mean([len(r["instruction"].split()) for r in kept]),
        "synthetic_response_words": _mean([len(r["output"].split()) for r in kept]),
        "synthetic_judge_score": _mean(scores),
        "synthetic_judged": float(len(scores)),
    }


class RatedJudge:
    """A judge that remembers every rating it gave, so measuring reuses the filter's ratings."""

    def __init__(self, judge: Judge) -> None:
        self.judge = judge
        self.label = judge.label
        self.ratings: dict[tuple[str, str], float] = {}  # by (question, answer)

    @classmethod
    def around(cls, judge: Judge | None) -> RatedJudge | None:
        """`judge` remembering its ratings; None (the judge filter is off) stays None."""
        return None if judge is None else cls(judge)

    def compare(self, question: str, first: str, second: str) -> Verdict | None:
        """The wrapped judge's verdict."""
        return self.judge.compare(question, first, second)

    def rate(self, question: str, answer: str) -> float | None:
        """The wrapped judge's rating, remembered when readable."""
        score = self.judge.rate(question, answer)
        if score is not None:
            self.ratings[question, answer] = score
        return score


def nearest_rouge_l(kept: Sequence[Record], local: Sequence[Record]) -> list[float]:
    """Each kept example's ROUGE-L F (instruction vs instruction) to its closest local record:
    a leakage proxy, 1.0 for a copy. Reads the records: it stays on the client."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [
        max(
            (scorer.score(r["instruction"], s["instruction"])["rougeL"].fmeasure for r in local),
            default=0.0,
        )
        for s in kept
    ]


def write_round(
    client_dir: Path, algorithm: str, round_: int, kept: Sequence[Record], local: Sequence[Record]
) -> Path:
    """Write the round's kept examples with their nearest-record ROUGE-L on the client's own disk
    (0600, atomically): one JSON line per example."""
    rows = [
        {
            "instruction": s["instruction"],
            "input": s.get("input", ""),
            "output": s["output"],
            NEAREST: score,
        }
        for s, score in zip(kept, nearest_rouge_l(kept, local), strict=True)
    ]
    target = client_synthetic_file(client_dir, algorithm, round_)
    write_private(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    return target


def read_nearest(files: Sequence[Path]) -> list[float]:
    """Every nearest-record ROUGE-L in round files written by `write_round`."""
    return [
        float(json.loads(line)[NEAREST])
        for file in files
        for line in file.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
