"""The wrapper that meters, screens and numbers the rounds of any Flower strategy.

`Metered` holds a Flower strategy and delegates to it, as Flower's DP wrappers do. It counts the
bytes of adapter records each round sends and receives (as serialised in Flower records, and as
raw tensor data), times the round, and keeps each client's reply metrics.
It also guards the aggregate: replies that fail screening (see silotune.federated.screening:
records, metric keys, weight, adapter) are left out and recorded, clients that errored or never
replied are recorded as dropped, a round with fewer valid updates than the quorum stops the run
(the last checkpoint stays), and an aggregate holding NaN or Inf is dropped: the previous global
adapter and server optimiser state are kept, and the round records why.
A resumed run numbers its rounds on from the checkpoint (`round_offset`), so clients derive the
same seeds and FedAdam the same bias correction as in an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from silotune.evaluation.intervals import ACCURACY, ROUGE_L, SCORE_NAMES
from silotune.federated import lora_ranks
from silotune.federated.screening import Expected, Layout, screen_round
from silotune.federated.uploads import UploadPlan
from silotune.modeling.adapters import StateDict
from silotune.privacy.budget import DECLINED
from silotune.records import adapter_to_record, record_to_adapter, tensor_bytes

ARRAYS = "arrays"
METRICS = "metrics"
PREDICTIONS = "predictions"
PER_RECORD = "per-record"  # a client's per-record held-out scores (see evaluation.intervals)
BASE_FINGERPRINT = "base-fingerprint"  # train config: what the server's model and adapter are
BASE_MODEL = "base-model"
# Server optimiser state Flower's strategies rebind (never mutate) in aggregate_train.
_OPTIMISER_STATE = ("m_t", "v_t", "momentum_vector", "current_arrays")


class FederationError(RuntimeError):
    """A round could not produce an update (fewer valid client updates than the quorum)."""


class BudgetsSpent(FederationError):
    """Too few clients have privacy budget left for a round: the run ends with the last one."""


@dataclass
class RoundTraffic:
    """What the metering wrapper saw in one training round."""

    started: float
    bytes_down: int
    tensor_bytes_down: int
    bytes_up: int = 0
    tensor_bytes_up: int = 0
    wall_s: float = 0.0
    clients: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # errored, rejected or silent clients
    layout: Layout | None = None  # names and shapes of the adapter sent out
    sent: ArrayRecord | None = None  # the adapter sent out (coded uploads are updates to it)
    correction: StateDict = field(default_factory=dict)  # FedEx's, sent with it
    sampled: set[int] = field(default_factory=set)  # node ids asked to train
    rejected: set[int] = field(default_factory=set)  # node ids whose reply failed screening
    client_evals: list[dict[str, Any]] = field(default_factory=list)
    client_predictions: list[list[str]] = field(default_factory=list)
    client_per_record: list[dict[str, list[float]]] = field(default_factory=list)
    declined: set[int] = field(default_factory=set)  # node ids whose privacy budget is spent
    # Each reply's bytes as it arrived (serialised, raw tensor data), by the reply's id(): counted
    # before a coded upload is decoded.
    arrived: dict[int, tuple[int, int]] = field(default_factory=dict)
    # The aggregate's products B·A against the exact weighted mean of the clients' (see
    # lora_ranks.product_gap); None where not measured.
    product_gap: float | None = None


class Metered(Strategy):
    """Wraps a Flower strategy (FedAvg or one built on it): meters, screens and numbers its
    rounds."""

    def __init__(self, strategy: FedAvg) -> None:
        self.strategy = strategy  # first: __setattr__ below routes by what it holds
        self.traffic: dict[int, RoundTraffic] = {}
        self.round_offset = 0  # rounds done before this run started (a resumed run)
        self.quorum = 1  # fewest valid updates a round aggregates
        self.expected_clients = 1  # the first round waits for all clients; later ones the quorum
        self.per_round = 1  # clients sampled to train each round
        self.max_weight_ratio = 10.0  # federated.max_weight_ratio
        self.known_weights: Mapping[int, float] = {}  # each client's weight, where known
        # Clients may decline a round (privacy.max_epsilon is set); otherwise a decline is a
        # malformed reply and screening rejects it.
        self.budgeted = False
        self.eval_records = 0  # held-out records each client's scores must cover (0: unknown)
        self.uploads: UploadPlan | None = None  # uploads of other ranks or coded; None: plain

    # A metered FedAdam reads and writes as the FedAdam it wraps: its settings and its server
    # optimiser state (what a checkpoint keeps) pass through to the wrapped strategy.
    def __getattr__(self, name: str) -> Any:
        if name == "strategy":  # not set yet (e.g. a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def __setattr__(self, name: str, value: Any) -> None:
        inner = self.__dict__.get("strategy")
        if name not in self.__dict__ and inner is not None and hasattr(inner, name):
            setattr(inner, name, value)
        else:
            super().__setattr__(name, value)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample and configure as the strategy does; count the bytes sent down."""
        server_round += self.round_offset
        self._wait_for(first=not self.traffic)
        started = time.perf_counter()
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        sent = [r for m in messages if (r := m.content.array_records.get(ARRAYS)) is not None]
        # What clients train and upload; FedEx's frozen correction travels down only.
        trainable, correction = arrays, StateDict()
        if self.uploads is not None and self.uploads.exact:
            adapter, correction = self.uploads.split(record_to_adapter(arrays))
            trainable = adapter_to_record(adapter)
        self.traffic[server_round] = RoundTraffic(
            started=started,
            bytes_down=sum(r.count_bytes() for r in sent),
            tensor_bytes_down=sum(tensor_bytes(r) for r in sent),
            layout=Layout.of(trainable),
            sent=trainable,
            correction=correction,
            sampled={m.metadata.dst_node_id for m in messages},
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record replies, drop-outs and rejected updates, then aggregate the valid ones."""
        replies = self.screen_replies(server_round, replies)
        server_round += self.round_offset
        traffic = self.traffic[server_round]
        traffic.failures += [
            f"{_sender(m)} failed: {m.error.reason}" for m in replies if m.has_error()
        ]
        ok = [m for m in replies if not m.has_error()]
        replied = {m.metadata.src_node_id for m in replies} | traffic.rejected | traffic.declined
        silent = traffic.sampled - replied
        traffic.failures += [f"node {n} dropped: no reply" for n in sorted(silent)]
        if len(ok) < self.quorum:
            reasons = "; ".join(traffic.failures) or "no client replied"
            if traffic.declined:
                raise BudgetsSpent(
                    f"round {server_round}: {len(ok)} client(s) with privacy budget left, fewer "
                    f"than the quorum of {self.quorum} (federated.quorum): {reasons}"
                )
            raise FederationError(
                f"round {server_round}: {len(ok)} valid update(s), fewer than the quorum of "
                f"{self.quorum} (federated.quorum): {reasons}"
            )
        arrived = [traffic.arrived.get(id(m), (0, 0)) for m in ok]
        traffic.bytes_up = sum(serialised for serialised, _ in arrived)
        traffic.tensor_bytes_up = sum(raw for _, raw in arrived)
        traffic.clients = [
            dict(metrics) for m in ok if (metrics := m.content.metric_records.get(METRICS))
        ]
        inner = self.strategy
        state = {name: getattr(inner, name) for name in _OPTIMISER_STATE if hasattr(inner, name)}
        arrays, metrics = inner.aggregate_train(server_round, ok)
        if arrays is not None and traffic.sent is not None:
            arrays = self._lora_aggregate(traffic, ok, arrays)
        if arrays is not None and (bad := _non_finite(arrays)):
            # Overflow in the average or the server optimiser: keep the last good state, so
            # nothing poisoned is evaluated, checkpointed or sent out next round.
            for name, value in state.items():
                setattr(inner, name, value)
            traffic.failures.append(
                f"aggregate dropped: {bad} holds NaN or Inf; the previous global adapter is kept"
            )
            arrays = None
        traffic.wall_s = time.perf_counter() - traffic.started
        return arrays, metrics

    def _lora_aggregate(
        self, traffic: RoundTraffic, ok: list[Message], arrays: ArrayRecord
    ) -> ArrayRecord:
        """The strategy's aggregate, or FLoRA's projection of the products, or (FedEx) the
        mean with its new correction; records how far its products are from the exact mean of
        the clients' (`product_gap`)."""
        assert traffic.sent is not None
        weights = [_weight(m, self.weighted_by_key) for m in ok]
        states = [record_to_adapter(m.content.array_records[ARRAYS]) for m in ok]
        plan, old = self.uploads, traffic.correction
        new: StateDict = {}
        if plan is not None and plan.stacking:
            arrays = plan.combine([m.content.array_records[ARRAYS] for m in ok], weights)
        aggregate = record_to_adapter(arrays)
        if plan is not None and plan.exact:
            new = plan.corrected(states, weights, aggregate, old)
            arrays = adapter_to_record(plan.joined(aggregate, new))
        # The models' products: each client's and the sent one with the correction they had,
        # the aggregate with its new one.
        merged = UploadPlan.merged
        traffic.product_gap = lora_ranks.product_gap(
            [merged(s, old) for s in states],
            weights,
            merged(aggregate, new),
            merged(record_to_adapter(traffic.sent), old),
        )
        return arrays

    def screen_replies(self, server_round: int, replies_in: Iterable[Message]) -> list[Message]:
        """The replies less the clients' declines (their privacy budget is spent) and those that
        fail screening, both of which the round records (errors pass)."""
        traffic = self.traffic[server_round + self.round_offset]
        replies = []
        for m in replies_in:
            metrics = None if m.has_error() else m.content.metric_records.get(METRICS)
            if self.budgeted and metrics is not None and DECLINED in metrics:
                traffic.failures.append(f"{_sender(m)} declined: its privacy budget is spent")
                traffic.declined.add(m.metadata.src_node_id)
            else:
                replies.append(m)
        arrived = []
        for m in replies:
            if not m.has_error() and (reason := self._arrive(traffic, m)) is not None:
                traffic.failures.append(f"{_sender(m)} rejected: {reason}")
                traffic.rejected.add(m.metadata.src_node_id)
            else:
                arrived.append(m)
        replies = arrived
        answered = [m.content for m in replies if not m.has_error()]
        verdicts = iter(screen_round(answered, self._expected(traffic.layout)))
        kept = []
        for m in replies:
            if m.has_error() or (reason := next(verdicts)) is None:
                kept.append(m)
            else:
                traffic.failures.append(f"{_sender(m)} rejected: {reason}")
                traffic.rejected.add(m.metadata.src_node_id)
        return kept

    def _arrive(self, traffic: RoundTraffic, message: Message) -> str | None:
        """Count a reply's upload as it came and, where uploads are of another rank or coded,
        put it into the server's layout in float32; why it cannot be, if it cannot."""
        key = id(message)  # the same object both times a DP round screens it
        record = message.content.array_records.get(ARRAYS)
        if key in traffic.arrived or record is None:  # seen (DP screens twice), or no upload
            return None
        traffic.arrived[key] = (record.count_bytes(), tensor_bytes(record))
        if self.uploads is None or self.uploads.plain or traffic.sent is None:
            return None
        metrics = message.content.metric_records.get(METRICS)
        client = metrics.get("client") if metrics else None
        decoded = self.uploads.decode(record, client, traffic.sent)
        if isinstance(decoded, str):
            return decoded
        message.content[ARRAYS] = decoded
        return None

    def _expected(self, layout: Layout | None) -> Expected:
        weight = self.strategy.weighted_by_key
        return Expected(ARRAYS, METRICS, weight, layout, self.max_weight_ratio, self.known_weights)

    def _wait_for(self, first: bool) -> None:
        """What Flower's sampling waits for: every client in the first round of a run, then only
        the quorum, so a client that dropped out does not hold the next rounds up."""
        inner = self.strategy
        inner.min_available_nodes = self.expected_clients if first else self.quorum
        inner.min_train_nodes = self.per_round if first else self.quorum
        if inner.min_evaluate_nodes:
            inner.min_evaluate_nodes = inner.min_available_nodes

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure client evaluation as the strategy does, in the run's round numbering."""
        server_round += self.round_offset
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

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
        traffic.client_per_record = [
            scores
            for m in ok
            if (record := m.content.config_records.get(PER_RECORD))
            and (scores := screen_per_record(dict(record), self.eval_records))
        ]
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """As the wrapped strategy."""
        self.strategy.summary()


BOUNDED_SCORES = (ROUGE_L, ACCURACY)


def screen_per_record(record: dict[str, Any], records: int = 0) -> dict[str, list[float]]:
    """A client's per-record scores if they are what evaluation writes (known score names,
    finite numbers, one per held-out record (`records`, 0: unknown) except ROUGE-L, which covers
    the first eval.generate_n); else nothing: a hostile reply gets no say in the intervals."""
    if not record or not set(record) <= set(SCORE_NAMES):
        return {}
    lists = list(record.values())
    if not all(isinstance(v, list) and all(isinstance(x, int | float) for x in v) for v in lists):
        return {}
    every = {len(v) for k, v in record.items() if k != ROUGE_L}
    n = records or max(every, default=0)
    if every - {n} or len(record.get(ROUGE_L, [])) > n:
        return {}
    if not all(math.isfinite(x) for v in lists for x in v):
        return {}
    # What evaluation can write: losses and token counts >= 0, ROUGE-L and correctness in [0, 1].
    bounded = {k: v for k, v in record.items() if k in BOUNDED_SCORES}
    if any(x < 0 for v in lists for x in v) or any(x > 1 for v in bounded.values() for x in v):
        return {}
    return {k: [float(x) for x in v] for k, v in record.items()}


def _non_finite(arrays: ArrayRecord) -> str | None:
    """The name of the first tensor in `arrays` holding NaN or Inf (None when all are finite)."""
    return next((k for k, a in arrays.items() if not np.isfinite(a.numpy()).all()), None)


def _weight(message: Message, key: str) -> float:
    """A screened reply's aggregation weight."""
    value = message.content.metric_records[METRICS][key]
    return float(value) if isinstance(value, int | float) else math.nan


def _sender(message: Message) -> str:
    metrics = message.content.metric_records.get(METRICS) if not message.has_error() else None
    client = metrics.get("client") if metrics else None
    node = f"node {message.metadata.src_node_id}"
    return f"client {client} ({node})" if client is not None else node


class ScreenFirst(Strategy):
    """`inner`, a wrapper around `metered` (Flower's DP), with `metered`'s screening before
    `inner` sees the replies: Flower's DP clipping raises on a malformed one."""

    def __init__(self, inner: Strategy, metered: Metered) -> None:
        self.inner, self.metered = inner, metered

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As `inner`."""
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen, then aggregate what passed as `inner`."""
        return self.inner.aggregate_train(
            server_round, self.metered.screen_replies(server_round, replies)
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As `inner`."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """As `inner`."""
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """As `inner`."""
        self.inner.summary()
