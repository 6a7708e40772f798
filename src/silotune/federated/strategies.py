"""Flower's own strategies, each extended by one mixin that meters rounds.

The mixin counts the bytes of adapter records each round sends and receives (as serialised in
Flower records, and as raw tensor data), times the round, keeps each
client's reply metrics, and refuses to go on when every client of a round failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from silotune.config import FederatedConfig
from silotune.records import tensor_bytes
from silotune.registry import Registry

ARRAYS = "arrays"
METRICS = "metrics"
PREDICTIONS = "predictions"


class FederationError(RuntimeError):
    """A round could not produce an update (every client failed)."""


@dataclass
class RoundTraffic:
    """What the metering mixin saw in one training round."""

    started: float
    bytes_down: int
    tensor_bytes_down: int
    bytes_up: int = 0
    tensor_bytes_up: int = 0
    wall_s: float = 0.0
    clients: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    client_evals: list[dict[str, Any]] = field(default_factory=list)
    client_predictions: list[list[str]] = field(default_factory=list)


class Metered(Strategy):
    """Mixin placed before a Flower strategy class: meters configure_train/aggregate_train."""

    traffic: dict[int, RoundTraffic]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample and configure as the strategy does; count the bytes sent down."""
        started = time.perf_counter()
        # The mixin always precedes a concrete strategy, so super() is never the abstract one.
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[safe-super]
        sent = [r for m in messages if (r := m.content.array_records.get(ARRAYS)) is not None]
        if not hasattr(self, "traffic"):
            self.traffic = {}
        self.traffic[server_round] = RoundTraffic(
            started=started,
            bytes_down=sum(r.count_bytes() for r in sent),
            tensor_bytes_down=sum(tensor_bytes(r) for r in sent),
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record replies and failures, then aggregate as the strategy does."""
        replies = list(replies)
        traffic = self.traffic[server_round]
        ok = [m for m in replies if not m.has_error()]
        traffic.failures = [str(m.error.reason) for m in replies if m.has_error()]
        if not ok:
            reasons = "; ".join(traffic.failures) or "no client replied"
            raise FederationError(f"round {server_round}: every client failed ({reasons})")
        received = [r for m in ok if (r := m.content.array_records.get(ARRAYS)) is not None]
        traffic.bytes_up = sum(r.count_bytes() for r in received)
        traffic.tensor_bytes_up = sum(tensor_bytes(r) for r in received)
        traffic.clients = [
            dict(metrics) for m in ok if (metrics := m.content.metric_records.get(METRICS))
        ]
        aggregated = super().aggregate_train(server_round, replies)  # type: ignore[safe-super]
        traffic.wall_s = time.perf_counter() - traffic.started
        return aggregated

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Keep each client's own evaluation, then aggregate as the strategy does."""
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        traffic = self.traffic[server_round]
        traffic.client_evals = [
            dict(metrics) for m in ok if (metrics := m.content.metric_records.get(METRICS))
        ]
        traffic.client_predictions = [
            [str(t) for t in texts]
            for m in ok
            if (record := m.content.config_records.get(PREDICTIONS))
            and isinstance(texts := record.get("text", []), list)
        ]
        return super().aggregate_evaluate(server_round, replies)  # type: ignore[safe-super]


class MeteredFedAvg(Metered, FedAvg):
    """FedAvg, metered."""


class MeteredFedProx(Metered, FedProx):
    """FedProx (sends `proximal-mu` to clients), metered."""


class MeteredFedAdam(Metered, FedAdam):
    """FedAdam (server-side Adam on the averaged update), metered."""


StrategyFactory = Callable[[FederatedConfig, int, bool, str], Metered]
STRATEGIES: Registry[StrategyFactory] = Registry("strategy")


def sampled_per_round(cfg: FederatedConfig, clients: int) -> int:
    """How many clients train each round."""
    return max(1, int(clients * cfg.fraction_train))


def _sampling(cfg: FederatedConfig, clients: int, client_eval: bool, weight: str) -> dict[str, Any]:
    per_round = sampled_per_round(cfg, clients)
    # The server always evaluates the global adapter; clients also evaluate when they infer
    # with more than it (FedPIT's private adapter), every client every round.
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 1.0 if client_eval else 0.0,
        "min_train_nodes": per_round,
        "min_evaluate_nodes": clients if client_eval else 0,
        "min_available_nodes": clients,
        "weighted_by_key": weight,
    }


@STRATEGIES.register("fedavg")
def _fedavg(cfg: FederatedConfig, clients: int, client_eval: bool, weight: str) -> Metered:
    return MeteredFedAvg(**_sampling(cfg, clients, client_eval, weight))


@STRATEGIES.register("fedprox")
def _fedprox(cfg: FederatedConfig, clients: int, client_eval: bool, weight: str) -> Metered:
    return MeteredFedProx(
        **_sampling(cfg, clients, client_eval, weight), proximal_mu=cfg.proximal_mu
    )


@STRATEGIES.register("fedadam")
def _fedadam(cfg: FederatedConfig, clients: int, client_eval: bool, weight: str) -> Metered:
    return MeteredFedAdam(**_sampling(cfg, clients, client_eval, weight), eta=cfg.server_lr)


def build_strategy(
    cfg: FederatedConfig, clients: int, client_eval: bool = False, weight: str = "num-examples"
) -> Metered:
    """The configured Flower strategy, metered; updates weighted by the metric `weight`."""
    return STRATEGIES.get(cfg.strategy)(cfg, clients, client_eval, weight)
