"""The canary audit: random secret records, the auditor's in/out guesses, and the one-run
empirical ε lower bound of Steinke, Nasr and Jagielski ("Privacy Auditing with One (1)
Training Run", NeurIPS 2023).

The audit: m canaries, each put into the training data with probability 1/2 independently.
After training, the auditor ranks them by score (how much training lowered their loss), guesses
"in" for the highest, "out" for the lowest and abstains on the rest. Under (ε, δ)-DP the number
of right guesses among r is, up to a δ term, no better than r coin flips that land right with
probability e^ε / (1 + e^ε). A count too high for that at confidence 1 - β rejects ε; the lower
bound is the largest ε rejected.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit
from scipy.stats import binom

from silotune.seeds import derive_seed

# Syllables rather than letters: words a tokenizer splits into a few pieces, so that a canary
# is long enough to memorise but short in tokens.
_ONSETS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
# Bisection steps on ε: 60 halvings of a bracket below 2^10 leave ~1e-15 of width.
_BISECTION_STEPS = 60
_MAX_EPSILON = 2.0**10


def make_canaries(m: int, seed: int, fields: Sequence[str], words: int = 8) -> list[dict[str, str]]:
    """`m` random secret records with `words` random words in each of `fields`; no two canaries
    share the text of any field."""
    if m < 0 or words < 1 or not fields:
        raise ValueError(f"make_canaries needs m >= 0, words >= 1 and fields, got {m}, {words}")
    rng = random.Random(derive_seed(seed, "canary-text"))
    seen: set[str] = set()

    def fresh_text() -> str:
        # A collision is astronomically unlikely (~14^24 texts per field); redrawing makes
        # "distinct" a guarantee rather than a probability.
        while True:
            text = " ".join(_word(rng) for _ in range(words))
            if text not in seen:
                seen.add(text)
                return text

    return [{field: fresh_text() for field in fields} for _ in range(m)]


def _word(rng: random.Random) -> str:
    """One random word of two to four consonant-vowel syllables."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 4)))


def choose_included(m: int, seed: int) -> list[bool]:
    """Which of `m` canaries go into the training data: each independently with probability
    1/2, the same for the same seed."""
    rng = random.Random(derive_seed(seed, "canary-included"))
    return [rng.random() < 0.5 for _ in range(m)]


def canary_score(loss_trained: float, loss_base: float) -> float:
    """How much training lowered a canary's loss, relative to the base model: 1 - trained/base
    (0: unchanged; higher: more likely a member)."""
    if not (math.isfinite(loss_trained) and loss_trained >= 0):
        raise ValueError(f"a canary's trained loss must be finite and >= 0, got {loss_trained}")
    if not (math.isfinite(loss_base) and loss_base > 0):
        raise ValueError(f"a canary's base loss must be finite and > 0, got {loss_base}")
    return 1.0 - loss_trained / loss_base


@dataclass(frozen=True)
class Guesses:
    """The auditor's call on each canary (True: in, False: out, None: abstained), how many
    calls it made, and how many were right (None when membership was not given)."""

    calls: tuple[bool | None, ...]
    made: int
    correct: int | None


def guess(
    scores: Sequence[float],
    included: Sequence[bool] | None,
    guesses: int,
    positives: int | None = None,
) -> Guesses:
    """Guess "in" for the `positives` highest scores and "out" for the `guesses - positives`
    lowest (default: half each), abstain on the rest; count the right calls if `included`."""
    k_in = guesses // 2 if positives is None else positives
    if not 0 <= k_in <= guesses <= len(scores):
        raise ValueError(
            f"need 0 <= positives ({k_in}) <= guesses ({guesses}) <= canaries ({len(scores)})"
        )
    if included is not None and len(included) != len(scores):
        raise ValueError(f"{len(scores)} scores but {len(included)} membership flags")
    # Stable sort: ties keep canary order, so the same scores always give the same calls.
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    calls: list[bool | None] = [None] * len(scores)
    for i in order[:k_in]:
        calls[i] = True
    for i in order[len(order) - (guesses - k_in) :]:
        calls[i] = False
    correct = None
    if included is not None:
        correct = sum(c is not None and c == bool(x) for c, x in zip(calls, included, strict=True))
    return Guesses(calls=tuple(calls), made=guesses, correct=correct)


def tail_bound(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The paper's bound on P[correct or more right guesses] for an (ε, δ)-DP algorithm:
    f(v) + 2mδ · max_i (f(v - i) - f(v)) / i, f(v) = P[Binomial(r, e^ε/(1+e^ε)) >= v]."""
    r, v = guesses, correct
    q = float(expit(epsilon))
    f_v = float(binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(1.0, f_v)
    # f(v - i) - f(v) = P[v - i <= W < v]: cumulative sums of the pmf below v. Past i = v it is
    # 1 - f(v) over a growing i, so i in 1..v holds the maximum.
    below = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # pmf at v-1, v-2, ..., 0
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, f_v + 2 * m * delta * alpha)


def epsilon_lower_bound(
    m: int, guesses: int, correct: int, delta: float, confidence: float = 0.95
) -> float:
    """The largest ε that `correct` right guesses out of `guesses` (among `m` canaries) reject
    for (ε, δ)-DP at `confidence`; 0.0 when they reject none."""
    if not 0 <= correct <= guesses <= m:
        raise ValueError(f"need 0 <= correct ({correct}) <= guesses ({guesses}) <= m ({m})")
    if not 0 <= delta < 1 or not 0 < confidence < 1:
        raise ValueError(f"need 0 <= delta < 1 and 0 < confidence < 1, got {delta}, {confidence}")
    beta = 1.0 - confidence

    def rejected(epsilon: float) -> bool:
        return tail_bound(m, guesses, correct, epsilon, delta) <= beta

    if not rejected(0.0):
        return 0.0
    # The bound grows with ε (a more accurate coin makes many right guesses likelier): find an
    # ε it no longer rejects, then bisect; at the cap the coin is exactly 1, so nothing is
    # rejected there.
    low, high = 0.0, 1.0
    while rejected(high) and high < _MAX_EPSILON:
        low, high = high, 2 * high
    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        if rejected(mid):
            low = mid
        else:
            high = mid
    return low


def empirical_epsilon(
    scores: Sequence[float],
    included: Sequence[bool],
    guesses: int,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """The audit in one call: guess from the scores, count right calls, return the ε lower
    bound."""
    # `guesses` is fixed before the scores are seen: taking the best ε over many choices of it
    # would test many hypotheses and void the stated confidence.
    calls = guess(scores, included, guesses)
    assert calls.correct is not None  # included was given
    return epsilon_lower_bound(len(scores), calls.made, calls.correct, delta, confidence)
