"""The server side of a federated algorithm, the same in simulation and in deployment.

FederatedServer builds the metered Flower strategy, evaluates the global adapter on the held-out
set after every round, checkpoints (see silotune.checkpoint) and, resumed, starts from the last
checkpoint with its rounds numbered on. Algorithms whose clients infer with more than the global
adapter (FedPIT: global + private) also evaluate on the clients; their mean is then the round's
headline metric and the global-only one is kept as `global_*`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from silotune.checkpoint import (
    RoundCheckpoint,
    load_round,
    python_random_state,
    restore_python_random,
    save_round,
)
from silotune.config import Config
from silotune.data.synthetic import SyntheticStats
from silotune.defences.federated import EQUAL_WEIGHT, describe, with_dp
from silotune.errors import UserError
from silotune.evaluation.evaluator import EvalSet
from silotune.evaluation.intervals import mean_over_models
from silotune.federated.local import LOCAL_ROLES
from silotune.federated.metering import (
    BASE_FINGERPRINT,
    BASE_MODEL,
    BudgetsSpent,
    FederationError,
    Metered,
    RoundTraffic,
    ScreenFirst,
)
from silotune.federated.strategies import (
    build_strategy,
    sampled_per_round,
)
from silotune.federated.uploads import UploadPlan
from silotune.jobs import AlgorithmResult, RoundLog, mean_metrics
from silotune.modeling.adapters import StateDict
from silotune.records import adapter_to_record, record_to_adapter
from silotune.training.workbench import Workbench

_EVAL_KEYS = ("eval_loss", "perplexity", "rouge_l")
# Server optimiser state: FedOpt-family moments (dicts by tensor name), FedAvgM's momentum (a
# list in the adapter's key order, kept by position).
_STRATEGY_STATE = ("m_t", "v_t", "momentum_vector")


class FederatedServer:
    """Runs `algorithm`'s rounds against whatever Grid Flower hands it."""

    def __init__(
        self,
        config: Config,
        bench: Workbench,
        eval_set: EvalSet,
        algorithm: str,
        clients: int,
        checkpoint: Path | None,  # the folder of its last round's checkpoint; None: none kept
        on_round: Callable[[RoundLog], None] = lambda _: None,
        client_examples: Sequence[int] = (),
    ) -> None:
        """`client_examples`: each client's example count, where the server knows it (FedIT in
        simulation) and each client must report it as its weight."""
        self.config, self.bench, self.eval_set, self.on_round = config, bench, eval_set, on_round
        self.clients = clients
        dp = config.defence.dp != "none"
        # With DP every client weighs 1, as the noise calibration assumes.
        weights = [1 if dp else n for n in client_examples]
        self.uploads = UploadPlan.of(config)
        self.strategy = build_strategy(
            config.federated,
            clients,
            # Clients infer with more than the server holds (FedPIT's private adapter, FedSA's
            # own B): they evaluate themselves.
            client_eval=LOCAL_ROLES.get(algorithm).evaluate is not None or self.uploads.a_only,
            weight=EQUAL_WEIGHT if dp else "num-examples",
            known_weights=dict(enumerate(weights)),
        )
        self.strategy.budgeted = config.privacy.max_epsilon > 0
        self.strategy.uploads = self.uploads
        self.strategy.eval_records = len(eval_set.examples)
        self.folder = checkpoint
        self.resumed = load_round(self.folder) if self.folder else None
        self.done = self.resumed.round if self.resumed else 0
        self.rounds: list[RoundLog] = self.resumed.rounds if self.resumed else []
        self.samples: list[dict[str, str]] = self.resumed.samples if self.resumed else []
        self.predictions: list[str] = self.resumed.predictions if self.resumed else []
        self.per_record = self.resumed.per_record if self.resumed else {}  # the global adapter's
        # What the server holds and sends: the adapter, or (FedSA) its A matrices.
        self.initial: StateDict = (
            self.resumed.arrays if self.resumed else self.uploads.shared(bench.initial)
        )
        self.results: list[Result] = []
        self.notes: list[str] = []
        if not self.uploads.standard:
            self.notes.append("Uploads: " + self.uploads.describe(clients))
        self.latest = self.initial  # the last evaluated global adapter
        self.ended_early = False  # too few clients had privacy budget left
        if self.resumed:
            self.strategy.round_offset = self.done
            restore_strategy_state(self.strategy, self.resumed.strategy_state)
            restore_python_random(self.resumed.random_state)
            self.notes.append(f"Resumed after round {self.done} from its checkpoint.")

    @property
    def remaining(self) -> int:
        """Rounds still to run."""
        return self.config.train.rounds - self.done

    def start(self, grid: Grid) -> None:
        """Run the remaining rounds with the (DP-wrapped) strategy on `grid`."""
        cfg = self.config
        strategy = with_dp(
            self.strategy, cfg.defence, sampled_per_round(cfg.federated, self.clients)
        )
        if strategy is not self.strategy:
            # Flower's DP wrappers clip each reply before the strategy sees it: screen first.
            strategy = ScreenFirst(strategy, self.strategy)
        try:
            result = strategy.start(
                grid=grid,
                initial_arrays=adapter_to_record(self.initial),
                num_rounds=self.remaining,
                timeout=cfg.federated.round_timeout_s,
                # Clients refuse to train against a different base model or adapter layout.
                train_config=ConfigRecord(
                    {BASE_FINGERPRINT: self.bench.fingerprint(), BASE_MODEL: self.bench.description}
                ),
                evaluate_fn=self.evaluate_fn,
            )
        except BudgetsSpent as exc:
            if not self.rounds:
                raise UserError(
                    f"no round could run: {exc}. Raise privacy.max_epsilon, or lower the noise's "
                    "cost per round (privacy.noise_multiplier, train.local_steps)"
                ) from None
            self.ended_early = True
            self.notes.append(
                f"The run ended after round {self.rounds[-1].round} of {cfg.train.rounds}: "
                "too few clients had privacy budget left for another round."
            )
            return
        self.results.append(result)

    def _final_adapter(self, final: StateDict) -> StateDict:
        """What a client would infer with from the server's last state: the adapter (FedSA:
        its A with B = 0; FedEx: with its correction, as one adapter of their summed rank)."""
        adapter, correction = self.uploads.split(final)
        return self.uploads.merged(self.uploads.whole(adapter, self.bench.initial), correction)

    def evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's central evaluation hook: evaluate, log and checkpoint the round."""
        if server_round == 0:
            return None  # the base model is evaluated once for all algorithms
        server_round += self.done
        state = record_to_adapter(arrays)
        if bad := [k for k, t in state.items() if not t.isfinite().all()]:
            # Never checkpoint poison: --resume would start from it.
            raise FederationError(
                f"round {server_round}: the global adapter's {bad[0]} holds NaN or Inf; the run "
                "stops with the last finite round's checkpoint"
            )
        self.latest = state
        # FedSA: the shared A with B = 0 (the base model's function); clients add their own B.
        # FedEx: the adapter with its frozen correction.
        adapter, correction = self.uploads.split(state)
        self.bench.set_correction(correction)
        whole = self.uploads.whole(adapter, self.bench.initial)
        evaluated = self.bench.evaluate(whole, self.eval_set, round_=server_round)
        traffic = self.strategy.traffic[server_round]
        log = _round_log(server_round, traffic, evaluated.metrics())
        self.rounds.append(log)
        self.samples[:] = evaluated.samples
        self.predictions[:] = evaluated.predictions
        self.per_record = evaluated.per_record
        if self.folder is not None:
            checkpoint = RoundCheckpoint(
                round=server_round,
                arrays=state,
                rounds=self.rounds,
                strategy_state=strategy_state(self.strategy),
                samples=self.samples,
                predictions=self.predictions,
                client_evals=traffic.client_evals,
                client_predictions=traffic.client_predictions,
                client_per_record=traffic.client_per_record,
                random_state=python_random_state(),
                per_record=self.per_record,
            )
            save_round(self.folder, checkpoint)
        self.on_round(log)
        return MetricRecord(dict(evaluated.metrics().items()))

    def result(self) -> AlgorithmResult:
        """The finished algorithm's result (after start, or straight from a final checkpoint)."""
        cfg, resumed = self.config, self.resumed
        self.bench.set_correction({})  # the bench serves the next algorithm as it was
        final = record_to_adapter(self.results[0].arrays) if self.results else self.latest
        if len(self.rounds) != cfg.train.rounds and not self.ended_early:
            raise RuntimeError("the Flower run ended before all rounds completed")
        if not final:
            raise FederationError(
                "no round produced an aggregate: a client failed in every round (with DP on, one "
                "failed client voids the round); run with --verbose to see the clients' errors"
            )
        synthetic = SyntheticStats()
        for log in self.rounds:
            for client in log.clients:
                if "failed" not in client:
                    synthetic.add(SyntheticStats.from_metrics(client))
        traffic = getattr(self.strategy, "traffic", {})
        last = traffic.get(self.rounds[-1].round) if self.rounds else None
        client_evals = last.client_evals if last else resumed.client_evals if resumed else []
        client_predictions = (
            last.client_predictions if last else resumed.client_predictions if resumed else []
        )
        client_scores = (
            last.client_per_record if last else resumed.client_per_record if resumed else []
        )
        name = type(self.strategy.strategy).__name__
        return AlgorithmResult(
            rounds=self.rounds,
            adapters={"global": self._final_adapter(final)},
            per_client_final=[_eval_metrics(c) for c in client_evals],
            samples=self.samples,
            # Judge what clients infer with: their own generations where they evaluate themselves.
            final_predictions=client_predictions or [self.predictions],
            synthetic=synthetic if synthetic.generated else None,
            # Where clients evaluate themselves (FedPIT) their models are the headline: each
            # record's score is the mean over the clients that scored every held-out record.
            final_per_record=_clients_mean(client_scores, self.per_record)
            if client_evals
            else self.per_record,
            notes=[f"Server strategy: Flower's {name}; {describe(cfg.defence)}.", *self.notes],
        )


def strategy_state(strategy: Metered) -> dict[str, dict[str, np.ndarray]]:
    """The server optimiser state a round checkpoint keeps, as named arrays."""
    state = {}
    for name in _STRATEGY_STATE:
        value = getattr(strategy.strategy, name, None)
        if isinstance(value, list):
            value = {f"{i:06d}": array for i, array in enumerate(value)}
        if isinstance(value, dict) and value:
            state[name] = dict(value)
    return state


def restore_strategy_state(strategy: Metered, state: dict[str, dict[str, np.ndarray]]) -> None:
    """Put checkpointed server optimiser state (see strategy_state) back into `strategy`."""
    for name, value in state.items():
        listed = name == "momentum_vector"
        restored = [value[k] for k in sorted(value)] if listed else dict(value)
        setattr(strategy.strategy, name, restored)


def _round_log(
    server_round: int, traffic: RoundTraffic, global_metrics: dict[str, float]
) -> RoundLog:
    metrics = dict(global_metrics)
    if traffic.client_evals:
        # Clients infer with more than the global adapter: their mean is the headline.
        metrics = {
            **mean_metrics([_eval_metrics(c) for c in traffic.client_evals]),
            **{f"global_{k}": v for k, v in global_metrics.items()},
        }
    if traffic.product_gap is not None:
        metrics["product_gap"] = traffic.product_gap
    losses = [float(c["train_loss"]) for c in traffic.clients]
    return RoundLog(
        round=server_round,
        metrics=metrics,
        train_loss=sum(losses) / len(losses) if losses else float("nan"),
        bytes_up=traffic.bytes_up,
        bytes_down=traffic.bytes_down,
        tensor_bytes_up=traffic.tensor_bytes_up,
        tensor_bytes_down=traffic.tensor_bytes_down,
        wall_s=traffic.wall_s,
        clients=[*traffic.clients, *({"failed": r} for r in traffic.failures)],
    )


def _clients_mean(
    clients: list[dict[str, list[float]]], server: dict[str, list[float]]
) -> dict[str, list[float]]:
    """Record-wise mean of the clients' scores of the whole held-out set (each metric over as
    many records as the server's own: loss on every record, generation metrics on the first
    eval.generate_n); nothing if no client sent them."""
    # The server's own scores say which the clients must send: a client leaving one out must
    # not take that metric's interval away from everyone.
    whole = [
        c
        for c in clients
        if set(c) == set(server) and all(len(c[k]) == len(v) for k, v in server.items())
    ]
    return mean_over_models(whole) if whole and any(server.values()) else {}


def _eval_metrics(client: dict[str, object]) -> dict[str, float]:
    return {
        k: float(v) for k, v in client.items() if k in _EVAL_KEYS and isinstance(v, int | float)
    }
