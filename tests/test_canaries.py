"""The one-run ε lower bound (Steinke, Nasr and Jagielski 2023), the auditor's guesses, and the
canaries themselves: fast, no models."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binom

from silotune.privacy.canaries import (
    canary_score,
    choose_included,
    empirical_epsilon,
    epsilon_lower_bound,
    guess,
    make_canaries,
    tail_bound,
)

BETA = 0.05


def perfect_pure_dp_bound(r: int) -> float:
    """All r guesses right under pure ε-DP: the paper's theorem makes the count dominated by
    Binomial(r, q), q = e^ε/(1+e^ε), so P[all right] <= q^r; rejecting at β gives q = β^(1/r)."""
    q = BETA ** (1 / r)
    return math.log(q / (1 - q))


def theorem_by_hand(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The paper's bound, written out with exact binomials and the max over every i in 1..m."""
    q = math.exp(epsilon) / (1 + math.exp(epsilon))

    def f(k: int) -> float:
        return sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(max(k, 0), r + 1))

    alpha = max((f(v - i) - f(v)) / i for i in range(1, m + 1))
    return min(1.0, f(v) + 2 * m * delta * alpha)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_right_under_pure_dp_matches_the_closed_form(r: int) -> None:
    assert epsilon_lower_bound(r, r, r, delta=0.0) == pytest.approx(perfect_pure_dp_bound(r))


def test_the_bound_sits_where_the_theorem_reaches_beta() -> None:
    m, r, v, delta = 200, 60, 52, 1e-3
    eps = epsilon_lower_bound(m, r, v, delta)
    assert eps > 0.5
    assert theorem_by_hand(m, r, v, eps, delta) == pytest.approx(BETA, rel=1e-6)
    assert theorem_by_hand(m, r, v, eps + 1e-3, delta) > BETA
    assert tail_bound(m, r, v, eps, delta) == pytest.approx(theorem_by_hand(m, r, v, eps, delta))


def appendix_d_bound(m: int, r: int, v: int, delta: float) -> float:
    """The ε lower bound as the paper's Appendix D computes it: its p-value (the max over i
    running to v only), ε stepped up by 1 until not rejected, then 30 halvings."""

    def p_value(eps: float) -> float:
        q = 1 / (1 + math.exp(-eps))
        alpha, below = 0.0, 0.0
        for i in range(1, v + 1):
            below += float(binom.pmf(v - i, r, q))
            alpha = max(alpha, below / i)
        return min(1.0, float(binom.sf(v - 1, r, q)) + 2 * m * delta * alpha)

    low, high = 0.0, 1.0
    while p_value(high) < BETA:
        high += 1
    for _ in range(30):
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(mid) < BETA else (low, mid)
    return low


# No (m, r, v, ε) figure of Steinke, Nasr and Jagielski (NeurIPS 2023) is checked here: only
# their abstract and introduction could be read when this was written, not the figures and
# tables. This checks the whole bound against the procedure the paper publishes (its Appendix D)
# instead, over a range of audit sizes at δ = 1e-5 and 95% confidence. Tolerance: Appendix D's
# 30 halvings of its bracket [0, 4] (every ε here is below 4) leave under 4e-9 of resolution.
@pytest.mark.parametrize(
    ("m", "r", "v", "delta"),
    [
        (100, 100, 100, 0.0),
        (1000, 100, 100, 1e-5),
        (1000, 50, 48, 1e-5),
        (1000, 200, 180, 1e-5),
        (10_000, 500, 450, 1e-5),
        (5000, 1000, 700, 1e-5),
        (1000, 1000, 520, 1e-5),
    ],
)
def test_the_bound_matches_the_papers_appendix_d_procedure(
    m: int, r: int, v: int, delta: float
) -> None:
    assert epsilon_lower_bound(m, r, v, delta) == pytest.approx(
        appendix_d_bound(m, r, v, delta), abs=1e-7
    )


def test_more_right_guesses_give_a_higher_bound() -> None:
    bounds = [epsilon_lower_bound(1000, 1000, v, 1e-5) for v in range(500, 1001, 50)]
    assert bounds == sorted(bounds)
    positive = [b for b in bounds if b > 0]
    assert len(set(positive)) == len(positive) >= 8


def test_coin_flip_guessing_concludes_nothing() -> None:
    # Half right, and half right plus one standard deviation (sqrt(1000)/2 ~ 16): chance.
    assert epsilon_lower_bound(1000, 1000, 500, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 1000, 516, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 0, 0, 1e-5) == 0.0
    assert 0 < epsilon_lower_bound(1000, 1000, 540, 1e-5) < 0.1


def test_all_right_under_pure_dp_grows_with_the_guesses() -> None:
    bounds = [epsilon_lower_bound(r, r, r, 0.0) for r in (5, 10, 50, 100, 500, 1000)]
    assert bounds == sorted(set(bounds))  # strictly increasing
    # Four right guesses are 1/16 > β under any ε: nothing rejected.
    assert epsilon_lower_bound(4, 4, 4, 0.0) == 0.0


@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-3])
@pytest.mark.parametrize(("m", "r"), [(100, 20), (100, 100), (1000, 100), (1000, 1000)])
def test_never_above_the_perfect_guess_maximum(m: int, r: int, delta: float) -> None:
    ceiling = perfect_pure_dp_bound(r)
    for v in range(0, r + 1, max(1, r // 10)):
        assert epsilon_lower_bound(m, r, v, delta) <= ceiling + 1e-9


def test_delta_and_more_canaries_only_lower_the_bound() -> None:
    r = v = 100
    pure = epsilon_lower_bound(100, r, v, 0.0)
    assert epsilon_lower_bound(100, r, v, 1e-5) < pure
    assert epsilon_lower_bound(10_000, r, v, 1e-5) < epsilon_lower_bound(100, r, v, 1e-5)


def test_a_higher_confidence_gives_a_lower_bound() -> None:
    assert epsilon_lower_bound(500, 500, 450, 1e-5, confidence=0.99) < epsilon_lower_bound(
        500, 500, 450, 1e-5, confidence=0.95
    )


@pytest.mark.parametrize(
    ("m", "r", "v", "delta", "confidence"),
    [(10, 20, 5, 0.0, 0.95), (10, 5, 6, 0.0, 0.95), (10, 5, 5, 1.0, 0.95), (10, 5, 5, 0.0, 1.0)],
)
def test_impossible_counts_are_refused(
    m: int, r: int, v: int, delta: float, confidence: float
) -> None:
    with pytest.raises(ValueError):
        epsilon_lower_bound(m, r, v, delta, confidence)


def test_guess_calls_the_top_in_and_the_bottom_out() -> None:
    scores = [0.9, 0.1, 0.5, 0.8, 0.3, 0.7]
    calls = guess(scores, None, guesses=4)
    assert calls.calls == (True, False, None, True, False, None)
    assert calls.made == 4
    assert calls.correct is None
    only_in = guess(scores, [True, False, False, True, False, True], guesses=3, positives=3)
    assert only_in.calls == (True, None, None, True, None, True)
    assert only_in.correct == 3
    mixed = guess(scores, [True, True, False, False, False, True], guesses=4)
    assert mixed.correct == 2  # right: canary 0 in, canary 4 out; wrong: 3 in, 1 out


def test_guess_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError):
        guess([0.1, 0.2], None, guesses=3)
    with pytest.raises(ValueError):
        guess([0.1, 0.2], None, guesses=1, positives=2)
    with pytest.raises(ValueError):
        guess([0.1, 0.2], [True], guesses=2)


def test_a_memorised_run_shows_a_large_epsilon_and_a_blind_one_none() -> None:
    included = choose_included(1000, seed=3)
    base = 4.0
    memorised = [canary_score(0.5 if x else base, base) for x in included]
    assert empirical_epsilon(memorised, included, guesses=200, delta=1e-5) > 3.0
    blind = [canary_score(base, base) for _ in included]  # every score ties: order is chance
    assert empirical_epsilon(blind, included, guesses=200, delta=1e-5) < 1.0


def test_canaries_are_reproducible_distinct_and_shaped_like_records() -> None:
    fields = ("instruction", "input", "output")
    canaries = make_canaries(500, seed=7, fields=fields)
    assert canaries == make_canaries(500, seed=7, fields=fields)
    assert canaries != make_canaries(500, seed=8, fields=fields)
    assert all(tuple(c) == fields for c in canaries)
    texts = [c[f] for c in canaries for f in fields]
    assert len(set(texts)) == len(texts)
    assert all(len(t.split()) == 8 and t.isascii() and t.islower() for t in texts)
    assert len(make_canaries(3, seed=7, fields=("output",), words=20)[0]["output"].split()) == 20


def test_inclusion_is_a_fair_reproducible_coin() -> None:
    included = choose_included(2000, seed=11)
    assert included == choose_included(2000, seed=11)
    assert included != choose_included(2000, seed=12)
    assert 900 < sum(included) < 1100  # ~4.5 standard deviations either side of 1000


def test_a_lower_trained_loss_scores_higher() -> None:
    assert canary_score(1.0, 4.0) > canary_score(3.0, 4.0) > canary_score(5.0, 4.0)
    assert canary_score(4.0, 4.0) == 0.0
    with pytest.raises(ValueError):
        canary_score(1.0, 0.0)
    with pytest.raises(ValueError):
        canary_score(float("nan"), 1.0)
