"""The privacy ledger of real runs: built from the rounds, declines under a budget, and a DP-SGD
federation that ends when its clients' budgets are spent."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from silotune.algorithms import ALGORITHMS
from silotune.cli import main
from silotune.config import load_config
from silotune.errors import ConfigError
from silotune.federated.metering import METRICS, BudgetsSpent
from silotune.jobs import RoundLog
from silotune.privacy import budget
from silotune.privacy.accounting import run_ledger
from silotune.privacy.ledger import compose
from silotune.privacy.mechanisms import GaussianUse
from silotune.training.dp import planned_use

from .conftest import CONFIGS
from .test_hostile_federated import HONEST_AVERAGE, SHAPE, _fresh, _honest, _request

# What a DP-SGD client of configs/tiny.toml with 40 records runs each round (noise 1.1).
USE = GaussianUse(1.1, 0.1, 3)


def _dp_config(*more: str):  # type: ignore[no-untyped-def]
    return load_config(
        CONFIGS / "tiny.toml",
        ['privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.1", *more],
    )


def _rounds(*entries: list[dict[str, object]]) -> list[RoundLog]:
    return [
        RoundLog(round=i + 1, metrics={"eval_loss": 1.0}, train_loss=1.0, clients=clients)
        for i, clients in enumerate(entries)
    ]


def test_the_ledger_composes_what_each_client_reported() -> None:
    config = _dp_config()
    releases = ALGORITHMS.get("fedit").releases(config)
    reported = {"client": 0, **USE.metrics("adapter")}
    rounds = _rounds([reported, {"failed": "node 9 dropped"}], [reported, {"client": 1}])
    ledger = run_ledger(config, releases, rounds, {0: 40, 1: 40})
    assert ledger.epsilon(0) == pytest.approx(compose([USE, USE], 1 / 400, "rdp"))
    # Client 1 took part once without reporting a DP use: that release is not private.
    assert math.isinf(ledger.epsilon(1))
    # A resumed run's rounds come back from its checkpoint as JSON: the same ε.
    again = [RoundLog.from_json(json.loads(json.dumps(r.to_json()))) for r in rounds]
    assert run_ledger(config, releases, again, {0: 40, 1: 40}).summary() == ledger.summary()


def test_a_reported_use_other_than_the_configured_one_is_not_believed() -> None:
    config = _dp_config()
    releases = ALGORITHMS.get("fedit").releases(config)
    assert planned_use(config.privacy, config.train, 40) == USE
    lying = GaussianUse(50.0, 0.1, 3)  # claims far more noise than the config asks for
    rounds = _rounds(
        [
            {"client": 0, **lying.metrics("adapter")},
            {"client": 1, **GaussianUse(float("nan"), 0.1, 3).metrics("adapter")},
            {"client": 7, **USE.metrics("adapter")},  # no such client
        ]
    )
    ledger = run_ledger(config, releases, rounds, {0: 40, 1: 40})
    assert math.isinf(ledger.epsilon(0)) and math.isinf(ledger.epsilon(1))
    assert (
        "not the configured" in ledger.summary()["clients"]["0"]["mechanisms"]["adapter"]["reason"]
    )
    assert {r["client"] for r in ledger.rows()} == {0, 1}


@pytest.mark.usefixtures("flower_task")
def test_without_a_budget_a_decline_is_a_malformed_reply() -> None:
    declined = Message(
        content=RecordDict({METRICS: MetricRecord({"client": 2, budget.DECLINED: 1})}),
        reply_to=_request(),
    )
    strategy = _fresh()  # privacy.max_epsilon not set
    aggregated, _ = strategy.aggregate_train(1, [*_honest(), declined])
    assert aggregated is not None
    (failure,) = strategy.traffic[1].failures
    assert "client 2 (node 7) rejected: " in failure


def test_every_release_of_a_run_without_dp_is_listed_as_infinite() -> None:
    config = load_config(CONFIGS / "tiny.toml")
    for name in ALGORITHMS:
        releases = ALGORITHMS.get(name).releases(config)
        assert releases and all(reason for reason in releases.values()), name
        ledger = run_ledger(config, releases, _rounds([], []), {0: 10, 1: 10})
        assert all(math.isinf(ledger.epsilon(c)) for c in (0, 1)), name
    pooled = run_ledger(config, {"records": "pooled"}, _rounds([], [], []), {0: 10})
    assert {r["round"] for r in pooled.rows()} == {1}  # records are pooled once


def test_central_dp_is_user_level_and_apart_from_record_level() -> None:
    config = _dp_config('defence.dp="server-fixed"', "defence.dp_noise_multiplier=2.0")
    releases = ALGORITHMS.get("fedit").releases(config)
    rounds = _rounds([{"client": 0, **USE.metrics("adapter")}])
    ledger = run_ledger(config, releases, rounds, {0: 40})
    summary = ledger.summary()["clients"]["0"]
    assert summary["mechanisms"]["central"]["level"] == "user"
    assert ledger.epsilon(0) == pytest.approx(compose([USE], 1 / 400, "rdp"))  # central apart


def test_a_declined_round_releases_nothing() -> None:
    config = _dp_config()
    rounds = _rounds([{"client": 0, **USE.metrics("adapter")}], [{"client": 0, budget.DECLINED: 1}])
    ledger = run_ledger(config, ALGORITHMS.get("locit").releases(config), rounds, {0: 40})
    assert {r["round"] for r in ledger.rows()} == {1}


def test_a_client_refuses_the_round_that_would_pass_its_budget() -> None:
    config = _dp_config("privacy.max_epsilon=3.0")
    store: dict[str, dict[str, torch.Tensor]] = {}
    planned = planned_use(config.privacy, config.train, 24)
    taken = 0
    with pytest.raises(budget.BudgetSpent, match=r"privacy\.max_epsilon = 3"):
        while True:
            budget.check_round(config, store, 24)
            budget.record(store, planned)
            taken += 1
    assert taken >= 1 and budget.spent(store) == [planned] * taken
    assert compose(budget.spent(store), 1 / 240, "rdp") <= 3.0
    assert compose([planned] * (taken + 1), 1 / 240, "rdp") > 3.0


def test_a_budget_needs_dp_sgd() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.mode = dp-sgd"):
        load_config(CONFIGS / "tiny.toml", ["privacy.max_epsilon=4"])


@pytest.mark.usefixtures("flower_task")
def test_declines_are_recorded_and_end_the_run_below_the_quorum() -> None:
    declined = Message(
        content=RecordDict({METRICS: MetricRecord({"client": 2, budget.DECLINED: 1})}),
        reply_to=_request(),
    )
    strategy = _fresh()
    strategy.budgeted = True  # privacy.max_epsilon is set
    aggregated, _ = strategy.aggregate_train(1, [*_honest(), declined])
    assert aggregated is not None
    np.testing.assert_allclose(aggregated["w"].numpy(), np.full(SHAPE, HONEST_AVERAGE), rtol=1e-6)
    assert strategy.traffic[1].failures == [
        "client 2 (node 7) declined: its privacy budget is spent"
    ]
    strategy = _fresh()
    strategy.budgeted, strategy.quorum = True, 3
    with pytest.raises(BudgetsSpent, match="privacy budget left"):
        strategy.aggregate_train(1, [*_honest(), declined])


@pytest.mark.slow
def test_a_dp_sgd_federation_stops_at_the_budget(tmp_path: Path) -> None:
    """FedIT with DP-SGD: every client affords two rounds of three; the run ends after two."""
    out = tmp_path / "run"
    code = main(
        [
            "run",
            str(CONFIGS / "tiny.toml"),
            *("--set", 'experiment.algorithms=["fedit"]', "--set", "train.rounds=3"),
            *("--set", 'privacy.mode="dp-sgd"', "--set", "privacy.noise_multiplier=1.0"),
            *("--set", "privacy.max_epsilon=2.2", "--out", str(out)),
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    for client in summary["privacy"]["clients"].values():
        assert 0 < client["epsilon"] <= 2.2 and client["mechanisms"]["adapter"]["guarantee"]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {r["client"] for r in last["privacy"]} == {0, 1, 2}
    assert "too few clients had privacy budget left" in (out / "report.md").read_text()


def test_a_sweep_reads_the_largest_client_epsilon_of_each_run() -> None:
    from silotune.privacy.ledger import largest_epsilon

    ledger = {"clients": {"0": {"epsilon": 2.5}, "1": {"epsilon": 3.5}}}
    assert largest_epsilon({"privacy": ledger}) == 3.5
    ledger["clients"]["2"] = {"epsilon": "inf"}
    assert math.isinf(largest_epsilon({"privacy": ledger}))
    assert math.isinf(largest_epsilon({}))  # a run written before the ledger claims nothing


@pytest.mark.slow
def test_a_resumed_dp_run_reports_the_same_epsilon_and_keeps_each_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after round 1 and resumed: the same ledger, and the clients' spending (kept in
    their own state) still stops the run after round 2 of 3."""
    from .test_resume import _whole_and_resumed

    config = load_config(
        CONFIGS / "tiny.toml",
        [
            "experiment.algorithms=['fedit']",
            "train.rounds=3",
            "eval.generate=false",
            'privacy.mode="dp-sgd"',
            "privacy.noise_multiplier=1.0",
            "privacy.max_epsilon=2.2",
        ],
    )
    whole, resumed = _whole_and_resumed(config, tmp_path, monkeypatch, ("fedit", 1))
    summaries = [json.loads((run / "summary.json").read_text()) for run in (whole, resumed)]
    assert [s["rounds"] for s in summaries] == [2, 2]
    assert summaries[0]["privacy"] == summaries[1]["privacy"]
