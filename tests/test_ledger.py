"""The per-client privacy ledger: ε per mechanism and per client, against Opacus's own."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from silotune.config import load_config
from silotune.config_privacy import PrivacyConfig
from silotune.jobs import RoundLog
from silotune.privacy.accounting import planned_uses, run_ledger
from silotune.privacy.ledger import Ledger, compose, epsilon_from_json, noise_for_target
from silotune.privacy.mechanisms import GaussianUse, joint
from silotune.privacy.noise import mechanism_seed

from .conftest import CONFIGS

DP = GaussianUse(noise_multiplier=1.1, sample_rate=0.05, steps=40)
NOISY = GaussianUse(noise_multiplier=2.0, sample_rate=0.1, steps=30)


def _opacus(engine: RDPAccountant | PRVAccountant, use: GaussianUse, delta: float) -> float:
    for _ in range(use.steps):
        engine.step(noise_multiplier=use.noise_multiplier, sample_rate=use.sample_rate)
    return float(engine.get_epsilon(delta=delta))


def test_one_mechanism_equals_opacus_rdp() -> None:
    ledger = Ledger({0: 200}, delta=1e-4)
    ledger.account(0, 1, "adapter", DP)
    expected = _opacus(RDPAccountant(), DP, 1e-4)
    assert ledger.epsilon(0, "adapter") == pytest.approx(expected, rel=1e-12)
    assert ledger.epsilon(0) == pytest.approx(expected, rel=1e-12)


def test_one_mechanism_equals_opacus_prv() -> None:
    use = GaussianUse(1.1, 0.05, 10)
    ledger = Ledger.for_config(PrivacyConfig(delta=1e-4, accountant="prv"), {0: 200})
    ledger.account(0, 1, "adapter", use)
    expected = _opacus(PRVAccountant(), use, 1e-4)
    assert ledger.epsilon(0) == pytest.approx(expected, rel=1e-9)


def test_rows_of_sampled_records_get_no_amplification_by_sampling() -> None:
    """A split client's activations show which records a step sampled: the round's mechanisms
    on those batches are accounted at rate 1, not at the sampling rate."""
    use = GaussianUse(4.0, 0.05, 10)
    ledger = Ledger({0: 200}, delta=1e-4)
    ledger.account(0, 1, "activations", use)
    ledger.account(0, 1, "adapter", use)
    ledger.account(0, 2, "adapter", use)  # a round without rows: amplified
    unamplified = dataclasses.replace(use, sample_rate=1.0)
    assert ledger.epsilon(0, "activations") == pytest.approx(compose([unamplified], 1e-4, "rdp"))
    expected = compose([joint([unamplified, unamplified]), use], 1e-4, "rdp")
    assert ledger.epsilon(0) == pytest.approx(expected)
    assert ledger.epsilon(0, "activations") > compose([use], 1e-4, "rdp")


def test_composing_two_mechanisms_gives_more_than_either() -> None:
    ledger = Ledger({0: 200}, delta=1e-4)
    # Different batches (FedPIT's private generator and the adapter): independent mechanisms.
    ledger.account(0, 1, "adapter", DP)
    ledger.account(0, 1, "synthetic", NOISY)
    both = ledger.epsilon(0)
    assert both > ledger.epsilon(0, "adapter") > 0
    assert both > ledger.epsilon(0, "synthetic") > 0
    assert both == pytest.approx(compose([DP, NOISY], 1e-4, "rdp"))


def test_rounds_compose_and_rows_carry_the_running_epsilon() -> None:
    ledger = Ledger({0: 200, 1: 50}, delta=1e-4)
    for r in (1, 2):
        ledger.account(0, r, "adapter", DP)
        ledger.account(1, r, "adapter", DP)
    rows = ledger.rows()
    assert [(row["client"], row["round"]) for row in rows] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert rows[0]["epsilon"] < rows[1]["epsilon"]
    assert rows[1]["epsilon"] == pytest.approx(compose([DP, DP], 1e-4, "rdp"))
    assert rows[1]["client_epsilon"] == rows[1]["epsilon"]
    assert ledger.rows(round=2) == [rows[1], rows[3]]
    assert {row["steps"] for row in rows} == {DP.steps}


def test_no_guarantee_is_infinite_and_listed() -> None:
    ledger = Ledger({0: 200}, delta=1e-4)
    ledger.account(0, 1, "adapter", DP)
    ledger.no_guarantee(0, 1, "synthetic", "its generator saw real records")
    assert math.isfinite(ledger.epsilon(0, "adapter"))
    assert ledger.epsilon(0, "synthetic") == math.inf
    assert ledger.epsilon(0) == math.inf
    summary = json.loads(json.dumps(ledger.summary(), allow_nan=False))
    client = summary["clients"]["0"]
    assert client["epsilon"] == "inf" and epsilon_from_json(client["epsilon"]) == math.inf
    assert client["mechanisms"]["synthetic"]["guarantee"] is False
    assert "real records" in client["mechanisms"]["synthetic"]["reason"]
    rows = ledger.rows()
    json.dumps(rows, allow_nan=False)
    synthetic = next(row for row in rows if row["mechanism"] == "synthetic")
    assert synthetic["noise_multiplier"] is None and synthetic["epsilon"] == "inf"


def test_central_is_user_level_and_never_composed_with_records() -> None:
    ledger = Ledger({0: 200, 1: 300}, delta=1e-4)
    ledger.account(0, 1, "adapter", DP)
    record_level = ledger.epsilon(0)
    ledger.account(0, 1, "central", GaussianUse(1.0, 1.0, 1))
    assert ledger.epsilon(0) == record_level
    assert ledger.epsilon(0, "central") > 0
    mechanisms = ledger.summary()["clients"]["0"]["mechanisms"]
    assert mechanisms["central"]["level"] == "user"
    assert mechanisms["adapter"]["level"] == "record"
    with pytest.raises(ValueError, match="user-level"):
        ledger.would_exceed(0, [("central", GaussianUse(1.0, 1.0, 1))], 10.0)


def test_central_without_amplification_matches_flowers_accountant() -> None:
    accounting = pytest.importorskip("flwr.supercore.privacy_accounting")
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    config = accounting.PrivacyConfig(
        target_delta=1e-3,
        population_size=10,
        neighboring_relation=accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=accounting.SamplingMethod.NO_AMPLIFICATION,
    )
    flower = RdpAccountant(config)
    flower.compose(accounting.GaussianPrivacyEvent(2.0, 10, 10), count=20)
    ledger = Ledger({c: 100 for c in range(10)}, delta=1e-3)
    ledger.account(0, 1, "central", GaussianUse(2.0, 1.0, 20))
    assert ledger.epsilon(0, "central") == pytest.approx(flower.get_epsilon(1e-3), rel=1e-6)


def test_serialization_round_trip_gives_identical_epsilon() -> None:
    ledger = Ledger({0: 200, 1: 80}, delta=0.0, accountant="rdp")
    ledger.account(0, 1, "activations", DP)
    ledger.account(0, 1, "gradients", GaussianUse(2.0, DP.sample_rate, DP.steps))  # same batches
    ledger.account(1, 1, "adapter", GaussianUse(0.9, 0.2, 17))
    ledger.no_guarantee(1, 2, "synthetic", "its generator saw real records")
    resumed = Ledger.from_json(json.loads(json.dumps(ledger.to_json(), allow_nan=False)))
    for client in (0, 1):
        assert resumed.epsilon(client) == ledger.epsilon(client)
        for mechanism in ("activations", "gradients", "adapter", "synthetic"):
            assert resumed.epsilon(client, mechanism) == ledger.epsilon(client, mechanism)
    assert resumed.summary() == ledger.summary()
    assert resumed.rows() == ledger.rows()
    # A resumed run goes on accounting exactly as an uninterrupted one.
    ledger.account(0, 2, "activations", DP)
    resumed.account(0, 2, "activations", DP)
    assert resumed.epsilon(0) == ledger.epsilon(0)


def test_would_exceed() -> None:
    ledger = Ledger({0: 200}, delta=1e-4)
    ledger.account(0, 1, "adapter", DP)
    now = ledger.epsilon(0)
    after = compose([DP, DP], 1e-4, "rdp")
    assert not ledger.would_exceed(0, [("adapter", DP)], after + 0.01)
    assert ledger.would_exceed(0, [("adapter", DP)], (now + after) / 2)
    assert ledger.would_exceed(0, [], now - 0.01)
    assert ledger.epsilon(0) == now  # asking changes nothing
    ledger.no_guarantee(0, 2, "synthetic", "not private")
    assert ledger.would_exceed(0, [], 1e9)


def test_noise_for_target_reaches_at_most_the_target() -> None:
    sigma = noise_for_target(4.0, 1e-5, 0.02, 500, "rdp")
    epsilon = compose([GaussianUse(sigma, 0.02, 500)], 1e-5, "rdp")
    assert 4.0 - 0.05 <= epsilon <= 4.0
    with pytest.raises(ValueError):
        noise_for_target(math.inf, 1e-5, 0.02, 500, "rdp")


def test_delta_defaults_to_a_tenth_of_one_over_the_records() -> None:
    ledger = Ledger.for_config(PrivacyConfig(), {0: 200, 1: 50})
    assert ledger.delta_of(0) == pytest.approx(1 / 2000)
    assert ledger.delta_of(1) == pytest.approx(1 / 500)
    ledger.account(1, 1, "adapter", DP)
    assert ledger.epsilon(1) == pytest.approx(compose([DP], 1 / 500, "rdp"))
    assert ledger.summary()["clients"]["1"]["delta"] == pytest.approx(1 / 500)
    assert Ledger.for_config(PrivacyConfig(delta=1e-6), {0: 200}).delta_of(0) == 1e-6
    with pytest.raises(ValueError, match="record count"):
        ledger.account(7, 1, "adapter", DP)


def test_noise_is_secret_unless_replayable_and_then_nothing_is_guaranteed() -> None:
    secret = PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0)
    assert mechanism_seed(secret, 0, "dp-noise") != mechanism_seed(secret, 0, "dp-noise")
    replay = PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, replayable_noise=True)
    assert mechanism_seed(replay, 0, "dp-noise") == mechanism_seed(replay, 0, "dp-noise")
    config = load_config(
        CONFIGS / "tiny.toml", ['privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.1"]
    )
    use = planned_uses(config, {"adapter": None}, 40)["adapter"]
    report = {"client": 0, **use.metrics("adapter")}
    rounds = [RoundLog(round=1, metrics={}, train_loss=1.0, clients=[report])]
    assert math.isfinite(run_ledger(config, {"adapter": None}, rounds, {0: 40}).epsilon(0))
    replayable = dataclasses.replace(
        config, privacy=dataclasses.replace(config.privacy, replayable_noise=True)
    )
    ledger = run_ledger(replayable, {"adapter": None}, rounds, {0: 40})
    assert ledger.epsilon(0) == math.inf
    assert "replayable" in ledger.summary()["clients"]["0"]["mechanisms"]["adapter"]["reason"]
