"""Flower's own strategies, each extended by one mixin that meters rounds.

The mixin counts the bytes of adapter records each round sends and receives (as serialised in
Flower records, and as raw tensor data), times the round, and keeps each client's reply metrics.
It also guards the aggregate: replies whose adapter fails screening (wrong names or shapes, NaN or
Inf) are left out and recorded, clients that errored or never replied are recorded as dropped,
and a round with fewer valid updates than the quorum stops the run (the last checkpoint stays).
A resumed run numbers its rounds on from the checkpoint (`round_offset`), so clients derive the
same seeds and FedAdam the same bias correction as in an uninterrupted run.
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
from silotune.federated.screening import Layout, screen
from silotune.records import tensor_bytes
from silotune.registry import Registry

ARRAYS = "arrays"
METRICS = "metrics"
PREDICTIONS = "predictions"
BASE_FINGERPRINT = "base-fingerprint"  # train config: what the server's model and adapter are
BASE_MODEL = "base-model"


class FederationError(RuntimeError):
    """A round could not produce an update (fewer valid client updates than the quorum)."""


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
    failures: list[str] = field(default_factory=list)  # errored, rejected or silent clients
    layout: Layout | None = None  # names and shapes of the adapter sent out
    sampled: set[int] = field(default_factory=set)  # node ids asked to train
    client_evals: list[dict[str, Any]] = field(default_factory=list)
    client_predictions: list[list[str]] = field(default_factory=list)


class Metered(Strategy):
    """Mixin placed before a Flower strategy class: meters, screens and numbers rounds."""

    traffic: dict[int, RoundTraffic]
    round_offset: int = 0  # rounds done before this run started (a resumed run)
    quorum: int = 1  # fewest valid updates a round aggregates
    expected_clients: int = 1  # the first round waits for all clients; later ones for the quorum
    per_round: int = 1  # clients sampled to train each round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample and configure as the strategy does; count the bytes sent down."""
        server_round += self.round_offset
        self._wait_for(first=not getattr(self, "traffic", None))
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
            layout=Layout.of(arrays),
            sampled={m.metadata.dst_node_id for m in messages},
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record replies, drop-outs and rejected updates, then aggregate the valid ones."""
        server_round += self.round_offset
        replies = list(replies)
        traffic = self.traffic[server_round]
        ok = []
        for m in replies:
            who = _sender(m)
            if m.has_error():
                traffic.failures.append(f"{who} failed: {m.error.reason}")
            elif reason := screen(m.content.array_records.get(ARRAYS), traffic.layout):
                traffic.failures.append(f"{who} rejected: {reason}")
            else:
                ok.append(m)
        silent = traffic.sampled - {m.metadata.src_node_id for m in replies}
        traffic.failures += [f"node {n} dropped: no reply" for n in sorted(silent)]
        if len(ok) < self.quorum:
            reasons = "; ".join(traffic.failures) or "no client replied"
            raise FederationError(
                f"round {server_round}: {len(ok)} valid update(s), fewer than the quorum of "
                f"{self.quorum} (federated.quorum): {reasons}"
            )
        received = [r for m in ok if (r := m.content.array_records.get(ARRAYS)) is not None]
        traffic.bytes_up = sum(r.count_bytes() for r in received)
        traffic.tensor_bytes_up = sum(tensor_bytes(r) for r in received)
        traffic.clients = [
            dict(metrics) for m in ok if (metrics := m.content.metric_records.get(METRICS))
        ]
        aggregated = super().aggregate_train(server_round, ok)  # type: ignore[safe-super]
        traffic.wall_s = time.perf_counter() - traffic.started
        return aggregated

    def _wait_for(self, first: bool) -> None:
        """What Flower's sampling waits for: every client in the first round of a run, then only
        the quorum, so a client that dropped out does not hold the next rounds up."""
        self.min_available_nodes = self.expected_clients if first else self.quorum
        self.min_train_nodes = self.per_round if first else self.quorum
        if getattr(self, "min_evaluate_nodes", 0):
            self.min_evaluate_nodes = self.min_available_nodes

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure client evaluation as the strategy does, in the run's round numbering."""
        server_round += self.round_offset
        return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[safe-super]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Keep each client's own evaluation, then aggregate as the strategy does."""
        server_round += self.round_offset
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


def _sender(message: Message) -> str:
    metrics = message.content.metric_records.get(METRICS) if not message.has_error() else None
    client = metrics.get("client") if metrics else None
    node = f"node {message.metadata.src_node_id}"
    return f"client {client} ({node})" if client is not None else node


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
    strategy = STRATEGIES.get(cfg.strategy)(cfg, clients, client_eval, weight)
    strategy.quorum = cfg.quorum
    strategy.expected_clients = clients
    strategy.per_round = sampled_per_round(cfg, clients)
    return strategy
