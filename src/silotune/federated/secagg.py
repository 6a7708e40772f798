"""Flower's SecAgg+ secure aggregation for federated runs (`[defence] secagg = true`).

SecAgg+ needs four exchanges a round (keys, key shares, masked uploads, unmasking), which
Flower runs only in its legacy workflow: a `DefaultWorkflow` whose fit step is Flower's
`SecAggPlusWorkflow` driving a legacy FedAvg (FedProx's server too) or FedAdam, and Flower's
`secaggplus_mod` before each client's train handler. The server unmasks only the weighted sum of
the uploads (each client's weight and metrics still travel in the clear). Legacy messages carry
unnamed arrays: they are mapped to our named adapter records by the adapter's key order, so the
client roles and both evaluations see the same records as without SecAgg+.

Uploads are scaled by weight / max_weight, clipped to ±8 and stochastically rounded to 2**22
levels: each averaged coordinate moves by under 3.8e-6 x clients x max_weight / total weight.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import (
    Code,
    FitRes,
    Parameters,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAdam, FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result
from numpy.typing import NDArray

from silotune.config import Config
from silotune.federated.metering import (
    ARRAYS,
    METRICS,
    FederationError,
    Metered,
    RoundTraffic,
)
from silotune.federated.strategies import (
    sampled_per_round,
)
from silotune.jobs import ALGORITHMS
from silotune.modeling.adapters import StateDict
from silotune.records import adapter_to_record, record_to_adapter

CLIPPING_RANGE = 8.0  # Flower's default: each weighted upload coordinate is clipped to ±this
QUANTIZATION_LEVELS = 2**22  # Flower's default
# Every sampled client holds a share of every other's keys; a round goes on while half of them
# finish it, and unmasking one client's upload would take about half colluding with the server.
NUM_SHARES = 1.0
RECONSTRUCTION_THRESHOLD = 0.5


def to_ndarrays(state: StateDict) -> list[NDArray[np.float32]]:
    """Adapter tensors -> unnamed float32 arrays in key order (SecAgg+ quantizes them anyway)."""
    return [t.detach().cpu().to(torch.float32).numpy() for t in state.values()]


def from_ndarrays(arrays: list[NDArray[np.generic]], template: StateDict) -> StateDict:
    """Unnamed arrays in key order -> adapter tensors with `template`'s names, shapes, dtypes."""
    state = {}
    for (key, like), array in zip(template.items(), arrays, strict=True):
        if tuple(array.shape) != tuple(like.shape):
            raise ValueError(f"{key}: expected shape {tuple(like.shape)}, got {array.shape}")
        state[key] = torch.tensor(np.asarray(array), dtype=like.dtype)
    return state


def max_weight(config: Config, algorithm: str, client_examples: list[int]) -> float:
    """The largest weight one client of `algorithm` can send (its registration says how it
    weighs), so that no upload is scaled up before Flower's ±8 clip."""
    return ALGORITHMS.get(algorithm).max_weight(config, client_examples)


def describe(config: Config, clients: int, weight_bound: float) -> str:
    """One line for the report."""
    sampled = sampled_per_round(config.federated, clients)
    step = 2 * CLIPPING_RANGE / QUANTIZATION_LEVELS
    return (
        f"Flower's SecAgg+ secure aggregation ({sampled} clients a round): the server unmasks "
        f"only the weighted sum of the uploads; quantization moves each averaged coordinate by "
        f"under {step:.1e} x {sampled} x {weight_bound:g} (max client weight) / total weight"
    )


def client_mods(template: Callable[[], StateDict]) -> list[Mod]:
    """Train mods: Flower's `secaggplus_mod`, then the translation to our message layout."""
    return [secaggplus_mod, partial(_legacy_layout_mod, template)]


def _legacy_layout_mod(
    template: Callable[[], StateDict], msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Hand the handler "fitins.*" as our named ARRAYS/"config"; turn its reply into "fitres.*",
    which `secaggplus_mod` then masks."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    state = from_ndarrays(parameters_to_ndarrays(fitins.parameters), template())
    msg.content = RecordDict(
        {ARRAYS: adapter_to_record(state), "config": ConfigRecord(dict(fitins.config))}
    )
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    metrics = reply.content.metric_records[METRICS]
    upload = record_to_adapter(reply.content.array_records[ARRAYS])
    scalars: dict[str, Scalar] = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    fitres = FitRes(
        status=Status(Code.OK, "ok"),
        parameters=ndarrays_to_parameters(to_ndarrays(upload)),
        num_examples=int(cast(float, metrics["num-examples"])),
        metrics=scalars,
    )
    reply.content = compat.fitres_to_recorddict(fitres, keep_input=False)
    return reply


@dataclass(frozen=True)
class SecAggPlan:
    """What the SecAgg+ server runs; `strategy` (the run's metered Message-API strategy) holds
    the rounds' traffic and asks clients to evaluate, as it does without SecAgg+."""

    strategy: Metered
    config: Config
    clients: int
    initial: StateDict
    max_weight: float
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None]


class _MeteredLegacy(FedAvg):
    """Mixin placed before a legacy Flower strategy: keeps the clients' metrics and the round's
    wall time in the traffic record _MeteredGrid opens when the round's first message leaves."""

    traffic: dict[int, RoundTraffic]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Record metrics and failures; every result already carries the unmasked average."""
        traffic = self.traffic[server_round]
        traffic.failures = [
            str(f) if isinstance(f, BaseException) else f[1].status.message for f in failures
        ]
        traffic.clients = [dict(res.metrics) for _, res in results]
        aggregated = super().aggregate_fit(server_round, results, failures)
        traffic.wall_s = time.perf_counter() - traffic.started
        return aggregated


class _SecAggFedAdam(_MeteredLegacy, FedAdam):
    """Legacy FedAdam (server-side Adam on the average), metered."""


def legacy_strategy(plan: SecAggPlan) -> _MeteredLegacy:
    """The configured strategy as Flower's legacy class, for `SecAggPlusWorkflow`."""
    cfg = plan.config.federated
    mu = cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0
    kwargs = {
        "fraction_fit": cfg.fraction_train,
        "fraction_evaluate": 0.0,  # clients evaluate through the Message API (FedPIT)
        "min_fit_clients": sampled_per_round(cfg, plan.clients),
        "min_available_clients": plan.clients,
        "initial_parameters": ndarrays_to_parameters(to_ndarrays(plan.initial)),
        "on_fit_config_fn": lambda rnd: {"server-round": rnd, "proximal-mu": mu},
    }
    strategy: _MeteredLegacy
    if cfg.strategy == "fedadam":
        # The Message-API FedAdam's settings, so both paths run the same optimizer.
        strategy = _SecAggFedAdam(
            **kwargs,  # type: ignore[arg-type]
            eta=cfg.server_lr,
            tau=cfg.server_tau,
            beta_1=cfg.server_beta_1,
            beta_2=cfg.server_beta_2,
        )
    else:  # FedProx's server is FedAvg's; its clients get proximal-mu in the fit config
        strategy = _MeteredLegacy(**kwargs)  # type: ignore[arg-type]
    strategy.traffic = plan.strategy.traffic
    return strategy


class _MeteredGrid:
    """The run's Grid, adding the record bytes of every train message (all four SecAgg+
    exchanges: keys, key shares, masked uploads, unmasking) to its round's traffic."""

    def __init__(self, grid: Grid, traffic: dict[int, RoundTraffic]) -> None:
        self._grid, self._traffic = grid, traffic

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send and receive as the Grid does, counting both ways."""
        sent = list(messages)
        for msg in sent:
            self._count(msg, down=True)
        replies = list(self._grid.send_and_receive(sent, timeout=timeout))
        for msg in replies:
            self._count(msg, down=False)
        return replies

    def _count(self, msg: Message, down: bool) -> None:
        if msg.metadata.message_type != MessageType.TRAIN or msg.has_error():
            return
        traffic = self._traffic.setdefault(
            int(msg.metadata.group_id),
            RoundTraffic(started=time.perf_counter(), bytes_down=0, tensor_bytes_down=0),
        )
        content = msg.content
        total = sum(_record_bytes(record) for record in content.values())
        if down:
            traffic.bytes_down += total
            # Legacy arrays carry no dtype/shape: their serialised size (npy headers included).
            arrays = content.array_records.values()
            traffic.tensor_bytes_down += sum(len(a.data) for r in arrays for a in r.values())
        else:
            traffic.bytes_up += total
            record = content.config_records.get(RECORD_KEY_CONFIGS, ConfigRecord())
            masked = cast(list[bytes], record.get(Key.MASKED_PARAMETERS, []))
            traffic.tensor_bytes_up += sum(len(b) for b in masked)


def _record_bytes(record: ArrayRecord | ConfigRecord | MetricRecord) -> int:
    """Flower's count_bytes, but ConfigRecord's fails on an empty list (e.g. no dropped client)."""
    if isinstance(record, ConfigRecord):
        record = ConfigRecord({k: v for k, v in record.items() if v != []})
    return record.count_bytes()


def _evaluate_round(plan: SecAggPlan, grid: Grid, ctx: Context) -> None:
    """DefaultWorkflow's evaluate step: clients evaluate (if the algorithm has them), then the
    server evaluates the new global adapter, in the Message-API path's order."""
    workflow_config = ctx.state.config_records[MAIN_CONFIGS_RECORD]
    server_round = cast(int, workflow_config[WorkflowKey.CURRENT_ROUND])
    traffic = plan.strategy.traffic.get(server_round)
    if traffic is None or not traffic.clients:  # aggregate_fit never ran
        raise FederationError(
            f"round {server_round}: SecAgg+ halted before an aggregate (too few clients "
            "completed the protocol); run with --verbose to see the clients' errors"
        )
    average = ctx.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
    state = from_ndarrays(average, plan.initial)
    # The unmasked average comes back float64: send the adapter's own dtype down next round.
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(to_ndarrays(state))
    arrays = adapter_to_record(state)
    # Clients evaluate only where the strategy asks them to (FedPIT's private adapters).
    messages = plan.strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
    timeout = plan.config.federated.round_timeout_s
    plan.strategy.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=timeout))
    plan.evaluate_fn(server_round, arrays)


def make_secagg_server_app(plan: SecAggPlan, on_result: Callable[[Result], None]) -> ServerApp:
    """A ServerApp running `plan` under SecAgg+; hands a Result with the final adapter on."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        plan.strategy.traffic = {}
        rounds = ServerConfig(num_rounds=plan.config.train.rounds)
        ctx = LegacyContext(context=context, config=rounds, strategy=legacy_strategy(plan))
        fit = SecAggPlusWorkflow(
            num_shares=NUM_SHARES,
            reconstruction_threshold=RECONSTRUCTION_THRESHOLD,
            max_weight=plan.max_weight,
            clipping_range=CLIPPING_RANGE,
            quantization_range=QUANTIZATION_LEVELS,
            timeout=plan.config.federated.round_timeout_s,
        )
        workflow = DefaultWorkflow(
            fit_workflow=fit, evaluate_workflow=partial(_evaluate_round, plan)
        )
        workflow(cast(Grid, _MeteredGrid(grid, plan.strategy.traffic)), ctx)
        final = ctx.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
        on_result(Result(arrays=adapter_to_record(from_ndarrays(final, plan.initial))))

    return app
