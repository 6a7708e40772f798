"""Run a federated algorithm on Flower's Simulation Engine (server side: FederatedServer)."""

from __future__ import annotations

import os
import sys
import time

import ray
from flwr.simulation import run_simulation

from silotune.federated import secagg
from silotune.federated.client_app import ClientSpec, make_client_app
from silotune.federated.server import FederatedServer
from silotune.federated.server_app import make_server_app
from silotune.federated.uploads import OWN_ADAPTER
from silotune.jobs import AlgorithmResult, Job
from silotune.modeling.adapters import load_adapter_state
from silotune.progress import PROGRESS_DIR, tick
from silotune.run_folder import client_adapter_dir, client_name


def run_federated(job: Job, algorithm: str, weighs_examples: bool = False) -> AlgorithmResult:
    """Run `algorithm`'s client role for `train.rounds` rounds under the configured strategy;
    `weighs_examples`: its clients weigh their updates by their examples, which the server knows
    here and checks."""
    cfg = job.config
    clients = len(job.client_examples)
    # SecAgg+ runs Flower's legacy workflow, which cannot start at a later round.
    checkpoint = None if cfg.defence.secagg else job.run.round_checkpoint(algorithm)
    examples = [len(e) for e in job.client_examples] if weighs_examples else []
    server = FederatedServer(
        cfg, job.workbench, job.eval_set, algorithm, clients, checkpoint, job.on_round, examples
    )
    if server.remaining:
        if cfg.defence.secagg:
            # Flower's legacy SecAgg+ workflow; it fills strategy.traffic and asks clients to
            # evaluate through `strategy` as the Message-API path does.
            bound = secagg.max_weight(cfg, algorithm, [len(e) for e in job.client_examples])
            secure = secagg.SecAggPlan(
                server.strategy, cfg, clients, server.initial, bound, server.evaluate_fn
            )
            server_app = secagg.make_secagg_server_app(secure, server.results.append)
            server.notes.append(secagg.describe(cfg, clients, bound))
        else:
            server_app = make_server_app(server.start)
        spec = ClientSpec(
            cfg,
            job.source,
            str(job.run.partitions),
            algorithm,
            str(job.run.clients),
            progress_dir=str(job.run.root / PROGRESS_DIR),
        )
        simulate(make_client_app(spec), server_app, clients, job.verbose, job.client_resources)
    result = server.result()
    if server.uploads.a_only:  # FedSA: each client's model is the shared A with its own B
        for c in range(clients):
            folder = client_adapter_dir(job.run.clients / client_name(c), OWN_ADAPTER)
            if folder.is_dir():
                result.adapters[client_name(c)] = load_adapter_state(folder)
    return result


def simulate(
    client_app: object,
    server_app: object,
    clients: int,
    verbose: bool = False,
    resources: dict[str, float] | None = None,
) -> None:
    """Run the apps on Flower's Simulation Engine: with `resources` (from the memory plan) as
    many clients at once as fit, else one worker using all CPUs at a time."""
    cpus = os.cpu_count() or 1
    init_args: dict[str, object] = {
        "num_cpus": cpus,
        "log_to_driver": verbose,
        "logging_level": "ERROR",
    }
    backend = {
        "client_resources": resources or {"num_cpus": cpus, "num_gpus": 0.0},
        "init_args": init_args,
    }
    tick("starting Flower's simulation", 0, 1)  # Ray takes a while to start its workers
    start_ray(init_args)  # Flower's backend uses a running Ray
    try:
        run_simulation(
            server_app=server_app,  # type: ignore[arg-type]
            client_app=client_app,  # type: ignore[arg-type]
            num_supernodes=clients,
            backend_config=backend,  # type: ignore[arg-type]
            verbose_logging=verbose,
        )
    finally:
        ray.shutdown()  # Flower's backend does on success; nothing of Ray outlives a run


RAY_STARTS = 3


def start_ray(init_args: dict[str, object], attempts: int = RAY_STARTS) -> None:
    """Start Ray for Flower's backend, trying again when it fails to come up.

    On a loaded machine Ray's head processes can miss their own start-up deadlines (its GCS
    server's port file, seen on a 2-core machine running other work); Flower then ends the
    simulation with a bare "An error was encountered". Nothing has run yet at this point, so
    starting again is safe. Workers get this process's import path, as Flower's backend gives
    them when it starts Ray itself."""
    if ray.is_initialized():
        return
    path = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = path
    for attempt in range(1, attempts + 1):
        try:
            ray.init(
                runtime_env={"env_vars": {"PYTHONPATH": path}},
                include_dashboard=False,
                **init_args,  # type: ignore[arg-type]
            )
            return
        except Exception as error:  # Ray raises RuntimeError, TimeoutError or its own types
            ray.shutdown()  # whatever half-started goes
            if attempt == attempts:
                raise RuntimeError(
                    f"Flower's simulation engine (Ray) failed to start {attempts} times; the "
                    f"last error: {error}. Free CPU or memory (or disk under /tmp) and run again."
                ) from error
            time.sleep(2.0 * attempt)
