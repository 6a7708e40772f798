"""FedIT: federated instruction tuning of one LoRA adapter, averaged by a stock Flower strategy."""

from __future__ import annotations

import os

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result
from flwr.simulation import run_simulation

from silotune.federated.algorithms.base import AlgorithmResult, Job, RoundLog, register
from silotune.federated.client_app import ClientSpec, make_client_app
from silotune.federated.server_app import ServerPlan, make_server_app
from silotune.federated.strategies import build_strategy
from silotune.records import adapter_to_record, record_to_adapter


@register("fedit", "federated", "one shared LoRA adapter averaged across clients (Flower)")
def run_fedit(job: Job) -> AlgorithmResult:
    """Run FedIT on Flower's Simulation Engine, evaluating the global adapter after each round."""
    cfg, bench = job.config, job.workbench
    clients = len(job.client_examples)
    strategy = build_strategy(cfg.federated, clients)
    rounds: list[RoundLog] = []
    samples: list[dict[str, str]] = []
    results: list[Result] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None  # the base model is evaluated once for all algorithms
        evaluated = bench.evaluate(record_to_adapter(arrays), job.eval_set)
        traffic = strategy.traffic[server_round]
        log = RoundLog(
            round=server_round,
            metrics=evaluated.metrics(),
            train_loss=_mean([c["train_loss"] for c in traffic.clients]),
            bytes_up=traffic.bytes_up,
            bytes_down=traffic.bytes_down,
            tensor_bytes_up=traffic.tensor_bytes_up,
            tensor_bytes_down=traffic.tensor_bytes_down,
            wall_s=traffic.wall_s,
            clients=[*traffic.clients, *({"failed": r} for r in traffic.failures)],
        )
        rounds.append(log)
        samples[:] = evaluated.samples
        job.on_round(log)
        return MetricRecord(dict(evaluated.metrics().items()))

    plan = ServerPlan(
        strategy=strategy,
        initial=adapter_to_record(bench.initial),
        rounds=cfg.train.rounds,
        round_timeout_s=cfg.federated.round_timeout_s,
        evaluate_fn=evaluate_fn,
    )
    spec = ClientSpec(cfg, job.source, str(job.partitions_dir))
    simulate(make_client_app(spec), make_server_app(plan, results.append), clients, job.verbose)
    if not results or len(rounds) != cfg.train.rounds:
        raise RuntimeError("the Flower simulation ended before all rounds completed")
    return AlgorithmResult(
        rounds=rounds,
        adapters={"global": record_to_adapter(results[0].arrays)},
        samples=samples,
        notes=[f"Server strategy: Flower's {type(strategy).__name__.removeprefix('Metered')}."],
    )


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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
