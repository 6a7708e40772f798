"""Paired bootstrap intervals over held-out records (scipy.stats.bootstrap), from per-record scores.

Each evaluated model keeps, per held-out record and in eval-set order, its summed response loss
and token count (`loss`, `tokens`), its ROUGE-L F (`rouge_l`) and its choice correctness
(`accuracy`). A metric over any resample of records is then eval_loss = Σloss / Σtokens (the
token-weighted loss the headline reports) or the mean of `rouge_l` / `accuracy`. Two models
evaluated on the same records are compared by resampling records (paired), so a record's
difficulty, shared by both models, cancels out of the difference.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import bootstrap
from scipy.stats import t as student_t

LOSS, TOKENS, ROUGE_L, ACCURACY = "loss", "tokens", "rouge_l", "accuracy"
SCORE_NAMES = (LOSS, TOKENS, ROUGE_L, ACCURACY)
# Held-out metric -> the per-record scores it is computed from.
SCORED = {"eval_loss": (LOSS, TOKENS), "rouge_l": (ROUGE_L,), "accuracy": (ACCURACY,)}
CONFIDENCE = 0.95
N_RESAMPLES = 2000
SEED = 0  # fixed: the same scores always give the same interval
BASE = "base"  # the untuned model's name where it is a reference
PER_RECORD = "per_record"  # the JSON key the scores are kept under

PerRecord = dict[str, list[float]]
Statistic = Callable[..., Any]


@dataclass(frozen=True)
class Interval:
    """A metric (or a difference of one) with its bootstrap interval; low/high None: no interval."""

    value: float
    low: float | None
    high: float | None
    records: int
    note: str = ""  # why the interval is degenerate, if it is

    @property
    def distinguishable(self) -> bool:
        """The interval excludes 0."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)

    def to_json(self, value_key: str = "diff") -> dict[str, Any]:
        """{diff (or value), low, high, distinguishable, records[, note]}, numbers only."""
        out: dict[str, Any] = {
            value_key: self.value,
            "low": self.low,
            "high": self.high,
            "distinguishable": self.distinguishable,
            "records": self.records,
        }
        return {**out, "note": self.note} if self.note else out

    @classmethod
    def from_json(cls, data: dict[str, Any], value_key: str = "diff") -> Interval:
        """Inverse of to_json."""
        return cls(
            float(data[value_key]),
            data["low"],
            data["high"],
            int(data["records"]),
            str(data.get("note", "")),
        )

    def cell(self) -> str:
        """`-0.0830 [-0.1010, -0.0640]*` (with minus signs); * marks an interval excluding 0."""
        if self.low is None or self.high is None:
            return f"{_signed(self.value)} (no interval: {self.note})"
        star = "*" if self.distinguishable else ""
        return f"{_signed(self.value)} [{_signed(self.low)}, {_signed(self.high)}]{star}"


def describe(records: int) -> str:
    """What the intervals in a report are, in one sentence."""
    return (
        "Δ: the row's metric minus the reference's, with its paired bootstrap "
        f"{CONFIDENCE * 100:.0f} % interval over the {records} held-out records (BCa, "
        f"{N_RESAMPLES} resamples, scipy.stats.bootstrap); * marks an interval that excludes 0. "
        "eval_loss is resampled as Σloss / Σtokens."
    )


def mean_over_models(scores: Sequence[PerRecord]) -> PerRecord:
    """Record-wise mean over several models' scores of the same records (e.g. LocIT's clients).

    Where the headline metric is the mean over models, this keeps it: with the same token counts
    per record, Σ mean loss / Σ tokens is the mean of the models' eval_loss.
    """
    if not scores or any(not s for s in scores):
        return {}
    keys = set.intersection(*(set(s) for s in scores))
    return {k: np.mean([s[k] for s in scores], axis=0).tolist() for k in sorted(keys)}


def paired_difference(a: PerRecord, b: PerRecord, metric: str) -> Interval | None:
    """metric(a) - metric(b) over the same records with its interval; None if either lacks it."""
    columns = SCORED[metric]
    if not _has(a, columns) or not _has(b, columns) or len(a[columns[0]]) != len(b[columns[0]]):
        return None
    ours = [np.asarray(a[c], dtype=float) for c in columns]
    theirs = [np.asarray(b[c], dtype=float) for c in columns]
    if all(np.array_equal(x, y) for x, y in zip(ours, theirs, strict=True)):
        return Interval(0.0, 0.0, 0.0, len(ours[0]), "identical scores on every record")
    k = len(columns)

    def diff(*samples: np.ndarray, axis: int = -1) -> Any:
        return _metric(samples[:k], axis) - _metric(samples[k:], axis)

    return _bootstrap(ours + theirs, diff)


def own_interval(a: PerRecord, metric: str) -> Interval | None:
    """metric(a) with the bootstrap interval of its own value; None if `a` lacks the scores."""
    columns = SCORED[metric]
    if not _has(a, columns):
        return None
    data = [np.asarray(a[c], dtype=float) for c in columns]

    def value(*samples: np.ndarray, axis: int = -1) -> Any:
        return _metric(samples, axis)

    return _bootstrap(data, value)


def compare(
    scores: Mapping[str, PerRecord], references: Sequence[str]
) -> dict[str, dict[str, dict[str, Interval]]]:
    """model -> reference -> metric -> difference (model - reference), for every model other
    than the reference; references without scores (did not run, or predate them) are skipped."""
    out: dict[str, dict[str, dict[str, Interval]]] = {}
    for name, own in scores.items():
        for ref in references:
            if ref == name or not scores.get(ref):
                continue
            diffs = {m: d for m in SCORED if (d := paired_difference(own, scores[ref], m))}
            if diffs:
                out.setdefault(name, {})[ref] = diffs
    return out


def comparison_json(compared: dict[str, dict[str, dict[str, Interval]]]) -> dict[str, Any]:
    """`compare`'s result as JSON numbers: model -> reference -> metric -> {diff, low, ...}."""
    return {
        name: {ref: {m: d.to_json() for m, d in diffs.items()} for ref, diffs in refs.items()}
        for name, refs in compared.items()
    }


def own_intervals(scores: PerRecord) -> dict[str, Any]:
    """metric -> {value, low, high, ...}: each metric's own bootstrap interval, as JSON."""
    return {m: i.to_json("value") for m in SCORED if (i := own_interval(scores, m))}


def records_of(scores: Mapping[str, PerRecord]) -> int:
    """How many held-out records the scores cover (0 when none has any)."""
    return max((len(next(iter(s.values()))) for s in scores.values() if s), default=0)


def mean_interval(values: Sequence[float]) -> tuple[float, float, float | None, float | None]:
    """Mean, sd and the t-interval (CONFIDENCE) of the mean of `values` (independent repeats:
    seeds, benchmark runs); no interval from fewer than two."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0, None, None
    sd = statistics.stdev(values)
    half = float(student_t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)) * sd / math.sqrt(len(values))
    return mean, sd, mean - half, mean + half


def over_seeds(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A difference over seeds: mean, sd, the t-interval of the mean, and each seed's own."""
    mean, sd, low, high = mean_interval([float(found["diff"]) for found in per_seed.values()])
    return {
        "mean": mean,
        "sd": sd,
        "low": low,
        "high": high,
        "distinguishable_seeds": sum(bool(f.get("distinguishable")) for f in per_seed.values()),
        "per_seed": per_seed,
    }


def seeds_cell(found: dict[str, Any] | None) -> str:
    """`+0.0100 ± 0.0050 [-0.0024, +0.0224] (1/3 seeds)` of an over_seeds result."""
    if not found:
        return "–"
    n = len(found["per_seed"])
    cell = f"{found['mean']:+.4f} ± {found['sd']:.4f}"
    if found["low"] is not None:
        cell += f" [{found['low']:+.4f}, {found['high']:+.4f}]"
    return f"{cell} ({found['distinguishable_seeds']}/{n} seeds)".replace("-", "−")


def _has(scores: PerRecord, columns: tuple[str, ...]) -> bool:
    return all(c in scores and len(scores[c]) > 0 for c in columns)


def _metric(samples: Sequence[np.ndarray], axis: int) -> Any:
    if len(samples) == 2:  # a ratio of sums: the token-weighted loss
        loss, tokens = samples
        return loss.sum(axis=axis) / np.maximum(tokens.sum(axis=axis), 1.0)
    return samples[0].mean(axis=axis)


def _bootstrap(data: list[np.ndarray], statistic: Statistic) -> Interval:
    n = len(data[0])
    point = float(statistic(*data))
    if n < 2:
        return Interval(point, None, None, n, "one record")
    # BCa needs spread in its jackknife; where the statistic is constant over records it has
    # none (scipy warns and returns NaN), and the percentile interval is the honest answer.
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ci = bootstrap(
                data,
                statistic,
                paired=True,
                vectorized=True,
                confidence_level=CONFIDENCE,
                n_resamples=N_RESAMPLES,
                method=method,
                rng=np.random.default_rng(SEED),
            ).confidence_interval
        low, high = float(ci.low), float(ci.high)
        if np.isfinite(low) and np.isfinite(high):
            return Interval(point, low, high, n, "" if method == "BCa" else "percentile")
    return Interval(point, point, point, n, "no spread over records: zero-width interval")


def _signed(value: float) -> str:
    return f"{value:+.4f}".replace("-", "−")
