"""The metering mixin on Flower's own strategies, driven with hand-made reply messages."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from silotune.config import config_from_dict
from silotune.config_federation import FederatedConfig
from silotune.federated.metering import (
    ARRAYS,
    METRICS,
    FederationError,
    Metered,
    RoundTraffic,
)
from silotune.federated.screening import Layout
from silotune.federated.strategies import (
    STRATEGIES,
    MeteredFedAdam,
    MeteredFedAvg,
    MeteredFedProx,
    build_strategy,
)
from silotune.records import tensor_bytes

pytestmark = pytest.mark.usefixtures("flower_task")


def _request() -> Message:
    content = RecordDict({ARRAYS: ArrayRecord({"w": torch.zeros(2, 3)}), "config": ConfigRecord()})
    return Message(content=content, dst_node_id=7, message_type="train")


def _reply(value: float, examples: int) -> Message:
    arrays = ArrayRecord({"w": torch.full((2, 3), value)})
    metrics = MetricRecord({"num-examples": examples, "train_loss": value, "train_s": 0.5})
    return Message(content=RecordDict({ARRAYS: arrays, METRICS: metrics}), reply_to=_request())


def _error_reply(reason: str) -> Message:
    return Message(Error(code=1, reason=reason), reply_to=_request())


def _fresh(round_: int = 1) -> MeteredFedAvg:
    strategy = build_strategy(FederatedConfig(), clients=3)
    assert isinstance(strategy, MeteredFedAvg)
    strategy.traffic = {round_: RoundTraffic(started=0.0, bytes_down=0, tensor_bytes_down=0)}
    return strategy


def test_aggregates_weighted_and_meters_replies() -> None:
    strategy = _fresh()
    replies = [_reply(1.0, 1), _reply(5.0, 3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), 4.0))
    traffic = strategy.traffic[1]
    assert traffic.tensor_bytes_up == 2 * 6 * 4
    assert traffic.bytes_up == sum(r.content.array_records[ARRAYS].count_bytes() for r in replies)
    assert [c["train_loss"] for c in traffic.clients] == [1.0, 5.0]
    assert traffic.failures == []
    assert traffic.wall_s > 0


def test_failed_clients_are_recorded_and_skipped() -> None:
    strategy = _fresh()
    arrays, _ = strategy.aggregate_train(1, [_reply(2.0, 2), _error_reply("out of memory")])
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), 2.0))
    assert strategy.traffic[1].failures == ["node 7 failed: out of memory"]


def test_a_round_below_the_quorum_stops_the_run() -> None:
    strategy = _fresh()
    with pytest.raises(FederationError, match=r"0 valid update.*quorum of 1.*disk full"):
        strategy.aggregate_train(1, [_error_reply("disk full")])
    strategy = _fresh()
    strategy.quorum = 2
    with pytest.raises(FederationError, match=r"1 valid update.*federated.quorum"):
        strategy.aggregate_train(1, [_reply(1.0, 1), _error_reply("killed")])


def _bad_reply(arrays: ArrayRecord, client: int = 5) -> Message:
    metrics = MetricRecord({"num-examples": 100, "client": client})
    return Message(content=RecordDict({ARRAYS: arrays, METRICS: metrics}), reply_to=_request())


@pytest.mark.parametrize(
    ("arrays", "reason"),
    [
        (ArrayRecord({"w": torch.full((2, 3), float("nan"))}), "w holds NaN or Inf"),
        (ArrayRecord({"w": torch.full((2, 3), float("inf"))}), "w holds NaN or Inf"),
        (ArrayRecord({"w": torch.zeros(3, 2)}), r"w has shape \(3, 2\), expected \(2, 3\)"),
        (ArrayRecord({"v": torch.zeros(2, 3)}), "wrong tensor names: missing w, unknown v"),
        (ArrayRecord({"w": torch.zeros(2, 3, dtype=torch.int64)}), "expected a floating-point"),
    ],
)
def test_bad_updates_are_rejected_before_aggregation(arrays: ArrayRecord, reason: str) -> None:
    strategy = _fresh()
    strategy.traffic[1].layout = Layout.of(_request().content.array_records[ARRAYS])
    # The bad update carries the largest weight: had it been averaged, the result would show it.
    aggregated, _ = strategy.aggregate_train(1, [_reply(2.0, 1), _bad_reply(arrays)])
    assert aggregated is not None
    np.testing.assert_array_equal(aggregated["w"].numpy(), np.full((2, 3), 2.0))
    (failure,) = strategy.traffic[1].failures
    assert failure.startswith("client 5 (node 7) rejected: ")
    assert re.search(reason, failure)


def test_clients_that_never_replied_are_recorded_as_dropped() -> None:
    strategy = _fresh()
    strategy.traffic[1].sampled = {7, 11, 12}
    strategy.aggregate_train(1, [_reply(1.0, 1)])
    assert strategy.traffic[1].failures == [
        "node 11 dropped: no reply",
        "node 12 dropped: no reply",
    ]


def test_resumed_rounds_are_numbered_on() -> None:
    strategy = _fresh(round_=5)
    strategy.round_offset = 4
    strategy.aggregate_train(1, [_reply(1.0, 1)])
    assert strategy.traffic[5].clients, "round 1 of the resumed run is round 5 of the run"


def test_strategy_choices_build_flower_strategies() -> None:
    assert isinstance(build_strategy(FederatedConfig(strategy="fedprox"), 2), MeteredFedProx)
    adam = build_strategy(FederatedConfig(strategy="fedadam", server_lr=0.05), 2)
    assert isinstance(adam, MeteredFedAdam) and adam.eta == 0.05
    prox = build_strategy(FederatedConfig(strategy="fedprox", proximal_mu=0.3), 4)
    assert isinstance(prox, MeteredFedProx) and prox.proximal_mu == 0.3
    half = build_strategy(FederatedConfig(fraction_train=0.5), 4)
    assert half.min_train_nodes == 2 and half.min_available_nodes == 4  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_choice_builds_a_metered_flower_strategy(name: str) -> None:
    # Seven clients: enough for every strategy's minimum with one hostile client (Bulyan: 4f + 3).
    config = config_from_dict({"partition": {"clients": 7}, "federated": {"strategy": name}})
    strategy = build_strategy(config.federated, 7)
    assert isinstance(strategy, Metered)
    assert strategy.quorum == config.federated.min_updates() and strategy.max_weight_ratio == 10


def test_strategy_settings_reach_flower() -> None:
    def built(**settings: object) -> object:
        cfg = FederatedConfig(**settings)  # type: ignore[arg-type]
        return build_strategy(cfg, 7)

    yogi = built(strategy="fedyogi", server_lr=0.2, server_tau=0.01, server_beta_1=0.5)
    assert (yogi.eta, yogi.tau, yogi.beta_1, yogi.beta_2) == (0.2, 0.01, 0.5, 0.99)  # type: ignore[attr-defined]
    adagrad = built(strategy="fedadagrad", server_lr=0.3)
    assert adagrad.eta == 0.3  # type: ignore[attr-defined]
    avgm = built(strategy="fedavgm", server_momentum=0.5, momentum_lr=0.7)
    assert (avgm.server_momentum, avgm.server_learning_rate) == (0.5, 0.7)  # type: ignore[attr-defined]
    assert built(strategy="fedtrimmedavg", trim_fraction=0.3).beta == 0.3  # type: ignore[attr-defined]
    krum = built(strategy="krum", malicious_clients=2)
    assert (krum.num_malicious_nodes, krum.num_nodes_to_select) == (2, 1)  # type: ignore[attr-defined]
    multi = built(strategy="multikrum", malicious_clients=2)
    assert multi.num_nodes_to_select == 5  # type: ignore[attr-defined]  # 7 clients - 2
    assert built(strategy="multikrum", multikrum_select=3).num_nodes_to_select == 3  # type: ignore[attr-defined]
    assert built(strategy="bulyan", malicious_clients=1).quorum == 7  # type: ignore[attr-defined]


def test_tensor_bytes_counts_raw_data_only() -> None:
    record = ArrayRecord({"a": torch.zeros(4, 5), "b": torch.zeros(3, dtype=torch.float64)})
    assert tensor_bytes(record) == 4 * 5 * 4 + 3 * 8
