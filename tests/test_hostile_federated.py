"""A hostile or buggy federated client cannot break a round: its reply is rejected and recorded.

Unit tests drive the metered strategies' aggregate_train with fabricated replies: two honest
clients and one attacker. Whatever the attack, the aggregate must equal the honest clients'
aggregate and the attacker must appear once among the round's failures.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from rich.console import Console
from safetensors.torch import load_file

from silotune.config import config_from_dict, load_config
from silotune.config_federation import DefenceConfig, FederatedConfig
from silotune.defences.federated import EQUAL_WEIGHT, with_dp
from silotune.errors import ConfigError
from silotune.federated.metering import (
    ARRAYS,
    METRICS,
    FederationError,
    Metered,
    RoundTraffic,
    ScreenFirst,
)
from silotune.federated.screening import Layout
from silotune.federated.strategies import (
    MeteredFedAvgM,
    build_strategy,
)
from silotune.runner import plan_experiment, run_experiment

from .conftest import CONFIGS

SHAPE = (2, 3)
# Honest clients: 1.0 with 10 examples, 3.0 with 30; their FedAvg is 2.5.
HONEST_AVERAGE = (1.0 * 10 + 3.0 * 30) / 40


def _request() -> Message:
    content = RecordDict({ARRAYS: ArrayRecord({"w": torch.zeros(SHAPE)}), "config": ConfigRecord()})
    return Message(content=content, dst_node_id=7, message_type="train")


def _metrics(client: int, examples: float) -> MetricRecord:
    return MetricRecord({"num-examples": examples, "client": client, "train_loss": 0.5})


def _reply(client: int, value: float, examples: float, **records: object) -> Message:
    content = {
        ARRAYS: ArrayRecord({"w": torch.full(SHAPE, value)}),
        METRICS: _metrics(client, examples),
    }
    content.update(records)  # type: ignore[arg-type]
    return Message(content=RecordDict(content), reply_to=_request())  # type: ignore[arg-type]


def _honest() -> list[Message]:
    return [_reply(0, 1.0, 10), _reply(1, 3.0, 30)]


def _fresh(strategy: Metered | None = None) -> Metered:
    strategy = strategy or build_strategy(FederatedConfig(), clients=3)
    strategy.traffic = {1: RoundTraffic(started=0.0, bytes_down=0, tensor_bytes_down=0)}
    strategy.traffic[1].layout = Layout.of(_request().content.array_records[ARRAYS])
    return strategy


def _assert_only_attacker_left_out(strategy: Metered, attacker: Message, reason: str) -> None:
    aggregated, _ = strategy.aggregate_train(1, [*_honest(), attacker])
    assert aggregated is not None
    np.testing.assert_allclose(aggregated["w"].numpy(), np.full(SHAPE, HONEST_AVERAGE), rtol=1e-6)
    (failure,) = strategy.traffic[1].failures
    assert "rejected: " in failure and reason in failure, failure


@pytest.mark.usefixtures("flower_task")
@pytest.mark.parametrize(
    ("weight", "reason"),
    [
        (float("nan"), "num-examples = nan, expected a finite number above 0"),
        (float("inf"), "num-examples = inf, expected a finite number above 0"),
        (-20, "num-examples = -20, expected a finite number above 0"),
        (0, "num-examples = 0, expected a finite number above 0"),
        # 1e12 would replace the model; the bound is 10 x the median weight (30).
        (
            1e12,
            "num-examples = 1e+12 is above federated.max_weight_ratio x the round's median "
            "weight (300)",
        ),
    ],
)
def test_a_bad_weight_is_rejected(weight: float, reason: str) -> None:
    _assert_only_attacker_left_out(
        _fresh(), _reply(2, 100.0, weight), f"client 2 (node 7) rejected: {reason}"
    )


@pytest.mark.usefixtures("flower_task")
def test_all_zero_weights_stop_the_round_with_every_client_named() -> None:
    strategy = _fresh()
    replies = [_reply(c, 1.0, 0) for c in range(3)]
    with pytest.raises(FederationError, match=r"0 valid update") as caught:
        strategy.aggregate_train(1, replies)
    assert str(caught.value).count("num-examples = 0, expected a finite number above 0") == 3


def _raw(arrays: object = None, metrics: object = None, **records: object) -> Message:
    """A reply from client 2 holding exactly the given records (defaults: a valid pair)."""
    content = {
        ARRAYS: arrays if arrays is not None else ArrayRecord({"w": torch.full(SHAPE, 100.0)}),
        METRICS: metrics if metrics is not None else _metrics(2, 20),
        **records,
    }
    return Message(
        content=RecordDict({k: v for k, v in content.items() if v != "absent"}),  # type: ignore[misc]
        reply_to=_request(),
    )


# Each builds the attacker's reply (messages can only be built once the task ids are set).
MALFORMED: dict[str, tuple[Callable[[], Message], str]] = {
    "extra-metric": (
        lambda: _raw(metrics=MetricRecord({**_metrics(2, 20), "evil": 1.0})),
        "metric keys differ from the other clients': unknown evil",
    ),
    "missing-metric": (
        lambda: _raw(metrics=MetricRecord({"num-examples": 20, "client": 2})),
        "metric keys differ from the other clients': missing train_loss",
    ),
    "second-arrayrecord": (
        lambda: _raw(second=ArrayRecord({"w": torch.ones(SHAPE)})),
        "wrong records: unknown second",
    ),
    "second-metricrecord": (
        lambda: _raw(more=MetricRecord({"num-examples": 1})),
        "wrong records: unknown more",
    ),
    "configrecord": (lambda: _raw(extra=ConfigRecord({"a": 1})), "wrong records: unknown extra"),
    "list-metric": (
        lambda: _raw(metrics=MetricRecord({**_metrics(2, 20), "train_loss": [0.1, 0.2]})),
        "metric train_loss is a list, expected a number",
    ),
    "metrics-not-metricrecord": (
        lambda: _raw(metrics=ConfigRecord({"num-examples": 20})),
        "'metrics' a MetricRecord",
    ),
    "no-arrays": (lambda: _raw(arrays="absent"), "wrong records: missing arrays"),
    "no-weight": (
        lambda: _raw(metrics=MetricRecord({"client": 2, "train_loss": 0.5})),
        "no 'num-examples' metric",
    ),
}


@pytest.mark.usefixtures("flower_task")
@pytest.mark.parametrize("attack", MALFORMED)
def test_a_malformed_reply_is_rejected_not_raised(attack: str) -> None:
    # Without screening, each of these raises InconsistentMessageReplies and the round is lost.
    build, reason = MALFORMED[attack]
    _assert_only_attacker_left_out(_fresh(), build(), reason)


@pytest.mark.usefixtures("flower_task")
def test_a_weight_other_than_the_clients_known_data_is_rejected() -> None:
    strategy = _fresh()
    strategy.known_weights = {0: 10, 1: 30, 2: 20}
    _assert_only_attacker_left_out(
        strategy, _reply(2, 100.0, 25), "num-examples = 25, but client 2's data gives 20"
    )
    strategy = _fresh()
    strategy.known_weights = {0: 10, 1: 30, 2: 20}
    _assert_only_attacker_left_out(
        strategy, _reply(9, 100.0, 20), "client id 9 is not one of this run's clients"
    )


@pytest.mark.usefixtures("flower_task")
@pytest.mark.parametrize("attack", ["second-arrayrecord", "wrong-shape", "nan-weight"])
def test_screening_comes_before_flowers_dp_clipping(attack: str) -> None:
    # Flower's server-side clipping reads every ArrayRecord of every reply: without screening
    # first, a second record or a wrong shape raises there and the round is lost.
    def reply(client: int, value: float, shape: tuple[int, ...] = SHAPE, **more: object) -> Message:
        metrics = MetricRecord({"dp-weight": more.pop("weight", 1), "client": client, "x": 0.5})
        content = {ARRAYS: ArrayRecord({"w": torch.full(shape, value)}), METRICS: metrics}
        return Message(content=RecordDict({**content, **more}), reply_to=_request())  # type: ignore[arg-type]

    metered = _fresh(build_strategy(FederatedConfig(), clients=3, weight=EQUAL_WEIGHT))
    defence = DefenceConfig(dp="server-fixed", dp_noise_multiplier=0.0, dp_clipping_norm=10.0)
    dp = with_dp(metered, defence, 3)
    dp.current_arrays = ArrayRecord({"w": torch.zeros(SHAPE)})  # type: ignore[attr-defined]
    attacker = {
        "second-arrayrecord": lambda: reply(2, 9.0, extra=ArrayRecord({"q": torch.ones(5)})),
        "wrong-shape": lambda: reply(2, 9.0, shape=(3, 2)),
        "nan-weight": lambda: reply(2, 9.0, weight=float("nan")),
    }[attack]()
    aggregated, _ = ScreenFirst(dp, metered).aggregate_train(
        1, [reply(0, 1.0), reply(1, 3.0), attacker]
    )
    assert aggregated is not None
    np.testing.assert_allclose(aggregated["w"].numpy(), np.full(SHAPE, 2.0), rtol=1e-6)
    (failure,) = metered.traffic[1].failures
    assert failure.startswith("client 2 (node 7) rejected: "), failure


@pytest.mark.usefixtures("flower_task")
def test_a_skewed_partition_the_server_knows_is_not_capped() -> None:
    # 500 examples is above 10 x the median (30), but it is what client 2's data gives.
    strategy = _fresh()
    strategy.known_weights = {0: 10, 1: 30, 2: 500}
    aggregated, _ = strategy.aggregate_train(1, [*_honest(), _reply(2, 100.0, 500)])
    assert aggregated is not None and strategy.traffic[1].failures == []
    np.testing.assert_allclose(aggregated["w"].numpy(), (10.0 + 90.0 + 50_000.0) / 540, rtol=1e-6)


@pytest.mark.usefixtures("flower_task")
def test_a_non_finite_aggregate_keeps_the_previous_global_and_optimiser_state() -> None:
    # A server learning rate that overflows float32: the aggregate becomes Inf.
    cfg = FederatedConfig(strategy="fedavgm", momentum_lr=3e38)
    strategy = _fresh(build_strategy(cfg, clients=3))
    assert isinstance(strategy, MeteredFedAvgM)
    before = ArrayRecord({"w": torch.zeros(SHAPE)})
    strategy.current_arrays = before
    aggregated, _ = strategy.aggregate_train(1, _honest())
    assert aggregated is None  # Flower then keeps (and evaluates) the previous global
    assert strategy.current_arrays is before and strategy.momentum_vector is None
    assert strategy.traffic[1].failures == [
        "aggregate dropped: w holds NaN or Inf; the previous global adapter is kept"
    ]


@pytest.mark.usefixtures("flower_task")
def test_fedavgm_momentum_survives_a_checkpoint() -> None:
    # Imported here: the server module is reached through the algorithms (see the runner).
    from silotune.federated.server import restore_strategy_state, strategy_state

    cfg = FederatedConfig(strategy="fedavgm")
    strategy = _fresh(build_strategy(cfg, clients=3))
    strategy.current_arrays = ArrayRecord({"w": torch.zeros(SHAPE), "v": torch.ones(4)})  # type: ignore[attr-defined]
    replies = [
        Message(
            content=RecordDict(
                {
                    ARRAYS: ArrayRecord({"w": torch.full(SHAPE, 2.0), "v": torch.zeros(4)}),
                    METRICS: _metrics(c, 10),
                }
            ),
            reply_to=_request(),
        )
        for c in range(2)
    ]
    strategy.traffic[1].layout = None
    strategy.aggregate_train(1, replies)
    resumed = _fresh(build_strategy(cfg, clients=3))
    restore_strategy_state(resumed, strategy_state(strategy))
    for theirs, ours in zip(resumed.momentum_vector, strategy.momentum_vector, strict=True):  # type: ignore[attr-defined]
        np.testing.assert_array_equal(theirs, ours)


# --- Robust aggregation ----------------------------------------------------------------------

ROBUST = ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"]


def _robustness_round(strategy_name: str, attack: str) -> tuple[float, float]:
    """(L-inf distance of the aggregate from the honest mean, the honest clients' spread)."""
    # Bulyan tolerates f hostile clients only among 4f + 3: one in seven; the others one in five.
    clients = 7 if strategy_name == "bulyan" else 5
    rng = np.random.default_rng(0)
    honest = [
        1.0 + 0.01 * rng.standard_normal(SHAPE).astype(np.float32) for _ in range(clients - 1)
    ]
    hostile = {"scaled": 100.0 * honest[0], "sign-flipped": -honest[0]}[attack]
    cfg = FederatedConfig(strategy=strategy_name, malicious_clients=1)  # type: ignore[arg-type]
    strategy = _fresh(build_strategy(cfg, clients=clients))
    replies = [
        Message(
            content=RecordDict(
                {ARRAYS: ArrayRecord({"w": torch.from_numpy(u)}), METRICS: _metrics(i, 100)}
            ),
            reply_to=_request(),
        )
        for i, u in enumerate([*honest, hostile])
    ]
    aggregated, _ = strategy.aggregate_train(1, replies)
    assert aggregated is not None and strategy.traffic[1].failures == []
    stack = np.stack(honest)
    distance = float(np.abs(aggregated["w"].numpy() - stack.mean(axis=0)).max())
    return distance, float((stack.max(axis=0) - stack.min(axis=0)).max())


@pytest.mark.usefixtures("flower_task")
@pytest.mark.parametrize("attack", ["scaled", "sign-flipped"])
@pytest.mark.parametrize("strategy_name", ROBUST)
def test_robust_strategies_keep_the_global_near_the_honest_average(
    strategy_name: str, attack: str
) -> None:
    # The bound: the honest clients' spread (largest per-coordinate max - min, ~0.05 here).
    # A median, a trimmed mean and Bulyan's trimmed mean around the median stay within the
    # honest values coordinate by coordinate while hostile clients are a tolerated minority;
    # Krum and MultiKrum pick honest updates. So the aggregate is within the spread of the
    # honest mean, wherever the hostile update points.
    distance, spread = _robustness_round(strategy_name, attack)
    assert distance <= spread, (distance, spread)


@pytest.mark.usefixtures("flower_task")
@pytest.mark.parametrize("attack", ["scaled", "sign-flipped"])
def test_fedavg_follows_one_hostile_client(attack: str) -> None:
    # Documented: FedAvg trusts every member; one in five moves the global by (hostile - 1) / 5
    # per coordinate: ~20 when scaled, ~0.4 when sign-flipped, far beyond the honest spread.
    distance, spread = _robustness_round("fedavg", attack)
    assert distance > 5 * spread, (distance, spread)


def _config(**federated: object) -> dict[str, object]:
    return {"partition": {"clients": 5}, "federated": federated}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {**_config(strategy="krum"), "defence": {"secagg": True}},
            "defence.secagg runs Flower's SecAgg\\+ workflow",
        ),
        ({**_config(strategy="fedmedian"), "defence": {"dp": "client-fixed"}}, "defence.dp"),
        (_config(strategy="bulyan"), "needs 7 clients training each round; 5 do"),
        (_config(strategy="multikrum", multikrum_select=6), "multikrum_select = 6"),
        ({"federated": {"strategy": "fedtrimmedavg"}}, "trims no update"),
        (_config(trim_fraction=0.5), "federated.trim_fraction"),
        (_config(max_weight_ratio=1.0), "federated.max_weight_ratio must be > 1"),
        (
            {
                "experiment": {"algorithms": ["fedpit"]},
                "synthetic": {"per_round": 16},
            },
            "set max_weight_ratio to at least 16",
        ),
        (_config(server_beta_2=1.0), "federated.server_beta_2 must be in \\[0, 1\\)"),
    ],
)
def test_strategy_settings_that_cannot_work_are_refused(
    raw: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


# --- End to end ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_client_reporting_nan_examples_is_left_out_of_a_simulated_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Imported here: the algorithms (which the runner imports first) import the simulation.
    from silotune.federated import simulation
    from silotune.federated.client_app import ClientSpec

    build = simulation.make_client_app

    def lying_client_app(spec: ClientSpec) -> ClientApp:
        honest = build(spec)
        app = ClientApp()

        # Defined here, so that Flower's workers receive it by value with the app.
        @app.train()
        def train(msg: Message, context: Context) -> Message:
            reply: Message = honest(msg, context)
            if context.node_config["partition-id"] == 2:
                reply.content[METRICS]["num-examples"] = float("nan")
            return reply

        return app

    monkeypatch.setattr(simulation, "make_client_app", lying_client_app)
    config = load_config(
        CONFIGS / "tiny.toml",
        ["experiment.algorithms=['fedit']", "train.rounds=2", "eval.generate=false"],
    )
    out = run_experiment(plan_experiment(config, tmp_path / "run"), Console(file=io.StringIO()))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        failures = [c["failed"] for c in row["clients"] if "failed" in c]
        assert len(failures) == 1 and failures[0].startswith("client 2 ("), failures
        assert "num-examples = nan" in failures[0]
        assert np.isfinite(row["eval_loss"])
    saved = load_file(str(out / "adapters" / "global" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
