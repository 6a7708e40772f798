"""Run a federated algorithm on Flower's Simulation Engine and collect its rounds.

The server evaluates the global adapter on the held-out set after every round. Algorithms whose
clients infer with more than the global adapter (FedPIT: global + private) also evaluate on the
clients; their mean is then the round's headline metric and the global-only one is kept as
`global_*`. After each round's evaluation the server checkpoints (see silotune.checkpoint); a
resumed run starts from the last one and numbers its rounds on from there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result
from flwr.simulation import run_simulation

from silotune.checkpoint import (
    RoundCheckpoint,
    load_round,
    python_random_state,
    restore_python_random,
    save_round,
)
from silotune.data.synthetic import SyntheticStats
from silotune.defences.federated import EQUAL_WEIGHT, describe, with_dp
from silotune.federated import secagg
from silotune.federated.algorithms.base import AlgorithmResult, Job, RoundLog, mean_metrics
from silotune.federated.client_app import ClientSpec, make_client_app
from silotune.federated.local import LOCAL_ROLES
from silotune.federated.server_app import ServerPlan, make_server_app
from silotune.federated.strategies import (
    FederationError,
    Metered,
    RoundTraffic,
    build_strategy,
    sampled_per_round,
)
from silotune.modeling.adapters import StateDict
from silotune.records import adapter_to_record, record_to_adapter

_EVAL_KEYS = ("eval_loss", "perplexity", "rouge_l")


def run_federated(job: Job, algorithm: str) -> AlgorithmResult:
    """Run `algorithm`'s client role for `train.rounds` rounds under the configured strategy."""
    cfg, bench = job.config, job.workbench
    role = LOCAL_ROLES.get(algorithm)
    clients = len(job.client_examples)
    dp = cfg.defence.dp != "none"
    strategy = build_strategy(
        cfg.federated,
        clients,
        client_eval=role.evaluate is not None,
        weight=EQUAL_WEIGHT if dp else "num-examples",
    )
    folder = _checkpoint_folder(job, algorithm)
    resumed = load_round(folder) if folder else None
    done = resumed.round if resumed else 0
    rounds: list[RoundLog] = resumed.rounds if resumed else []
    samples: list[dict[str, str]] = resumed.samples if resumed else []
    predictions: list[str] = resumed.predictions if resumed else []
    initial = resumed.arrays if resumed else bench.initial
    if resumed:
        strategy.round_offset = done
        _restore_strategy(strategy, resumed.strategy_state)
        restore_python_random(resumed.random_state)
    results: list[Result] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None  # the base model is evaluated once for all algorithms
        server_round += done
        state = record_to_adapter(arrays)
        evaluated = bench.evaluate(state, job.eval_set)
        traffic = strategy.traffic[server_round]
        log = _round_log(server_round, traffic, evaluated.metrics())
        rounds.append(log)
        samples[:] = evaluated.samples
        predictions[:] = evaluated.predictions
        if folder is not None:
            checkpoint = RoundCheckpoint(
                round=server_round,
                arrays=state,
                rounds=rounds,
                strategy_state=_strategy_state(strategy),
                samples=samples,
                predictions=predictions,
                client_evals=traffic.client_evals,
                client_predictions=traffic.client_predictions,
                random_state=python_random_state(),
            )
            save_round(folder, checkpoint)
        job.on_round(log)
        return MetricRecord(dict(evaluated.metrics().items()))

    notes: list[str] = []
    if done:
        notes.append(f"Resumed after round {done} from its checkpoint.")
    if done < cfg.train.rounds:
        _simulate_rounds(
            job, algorithm, strategy, initial, cfg.train.rounds - done, evaluate_fn, results, notes
        )
        final = record_to_adapter(results[0].arrays) if results else {}
    else:
        final = initial
    if len(rounds) != cfg.train.rounds:
        raise RuntimeError("the Flower simulation ended before all rounds completed")
    if not final:
        raise FederationError(
            "no round produced an aggregate: a client failed in every round (with DP on, one "
            "failed client voids the round); run with --verbose to see the clients' errors"
        )
    synthetic = SyntheticStats()
    for log in rounds:
        for client in log.clients:
            if "failed" not in client:
                synthetic.add(SyntheticStats.from_metrics(client))
    last = strategy.traffic.get(cfg.train.rounds) if hasattr(strategy, "traffic") else None
    client_evals = last.client_evals if last else resumed.client_evals if resumed else []
    client_predictions = (
        last.client_predictions if last else resumed.client_predictions if resumed else []
    )
    return AlgorithmResult(
        rounds=rounds,
        adapters={"global": final},
        per_client_final=[_eval_metrics(c) for c in client_evals],
        samples=samples,
        # Judge what clients infer with: their own generations where they evaluate themselves.
        final_predictions=client_predictions or [predictions],
        synthetic=synthetic if synthetic.generated else None,
        notes=[
            f"Server strategy: Flower's {type(strategy).__name__.removeprefix('Metered')}; "
            f"{describe(cfg.defence)}.",
            *notes,
        ],
    )


def _simulate_rounds(
    job: Job,
    algorithm: str,
    strategy: Metered,
    initial: StateDict,
    rounds: int,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None],
    results: list[Result],
    notes: list[str],
) -> None:
    """Run `rounds` rounds on the Simulation Engine, starting from `initial`."""
    cfg, clients = job.config, len(job.client_examples)
    if cfg.defence.secagg:
        # Flower's legacy SecAgg+ workflow; it fills strategy.traffic and asks clients to
        # evaluate through `strategy` as the Message-API path does.
        bound = secagg.max_weight(cfg, algorithm, [len(e) for e in job.client_examples])
        secure = secagg.SecAggPlan(strategy, cfg, clients, initial, bound, evaluate_fn)
        server_app = secagg.make_secagg_server_app(secure, results.append)
        notes.append(secagg.describe(cfg, clients, bound))
    else:
        plan = ServerPlan(
            strategy=with_dp(strategy, cfg.defence, sampled_per_round(cfg.federated, clients)),
            initial=adapter_to_record(initial),
            rounds=rounds,
            round_timeout_s=cfg.federated.round_timeout_s,
            evaluate_fn=evaluate_fn,
        )
        server_app = make_server_app(plan, results.append)
    spec = ClientSpec(cfg, job.source, str(job.partitions_dir), algorithm, str(job.clients_dir))
    simulate(make_client_app(spec), server_app, clients, job.verbose)


def _checkpoint_folder(job: Job, algorithm: str) -> Path | None:
    # SecAgg+ runs Flower's legacy workflow, which cannot start at a later round.
    if job.checkpoints_dir is None or job.config.defence.secagg:
        return None
    return job.checkpoints_dir / algorithm / "round"


_STRATEGY_STATE = ("m_t", "v_t")  # FedOpt-family server optimiser moments


def _strategy_state(strategy: Metered) -> dict[str, dict[str, np.ndarray]]:
    return {
        name: dict(value)
        for name in _STRATEGY_STATE
        if isinstance(value := getattr(strategy, name, None), dict) and value
    }


def _restore_strategy(strategy: Metered, state: dict[str, dict[str, np.ndarray]]) -> None:
    for name, value in state.items():
        setattr(strategy, name, dict(value))


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


def _eval_metrics(client: dict[str, object]) -> dict[str, float]:
    return {
        k: float(v) for k, v in client.items() if k in _EVAL_KEYS and isinstance(v, int | float)
    }


def simulate(client_app: object, server_app: object, clients: int, verbose: bool = False) -> None:
    """Run the apps on Flower's Simulation Engine, one worker using all CPUs at a time."""
    cpus = os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "log_to_driver": verbose, "logging_level": "ERROR"},
    }
    run_simulation(
        server_app=server_app,  # type: ignore[arg-type]
        client_app=client_app,  # type: ignore[arg-type]
        num_supernodes=clients,
        backend_config=backend,  # type: ignore[arg-type]
        verbose_logging=verbose,
    )
