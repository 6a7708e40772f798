"""The Flower app that `flwr run` deploys: a ServerApp and a ClientApp driven by run config.

Run config (the same for the server and every client, sent by `flwr run`):
    silotune-config   the experiment config as JSON (one federated algorithm)
    out               the server's output folder (written on the SuperLink's machine)
    eval-path         the server's held-out records (JSON Lines)

Node config (each SuperNode's own, given to `flower-supernode --node-config`):
    partition-id      the client's number (its seeds and its name in the results)
    data-path         this client's records; no other node is told where they are
    eval-path         held-out records, for algorithms whose clients evaluate (FedPIT)
    state-dir         the client's own folder for its private adapter and state

The server writes OUT.incomplete and renames it to OUT when the run has finished; an
interrupted run continues from its checkpoints when it is started again with the same OUT.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from silotune.algorithms import ALGORITHMS
from silotune.config import Config, config_from_dict
from silotune.data.load import load_client_records
from silotune.evaluation.evaluator import build_eval_set
from silotune.federated.client_app import ClientSpec, make_client_app
from silotune.federated.server import FederatedServer
from silotune.modeling.adapters import adapter_nbytes
from silotune.modeling.load import resolve_model
from silotune.report.context import RunContext
from silotune.report.outputs import write_run
from silotune.run_folder import RunFolder, work_folder, write_json
from silotune.training.workbench import Workbench

server_app = ServerApp()


def run_config(context: Context) -> tuple[Config, Path, Path]:
    """The experiment config, the output folder and the server's held-out file."""
    cfg = config_from_dict(json.loads(str(context.run_config["silotune-config"])))
    return cfg, Path(str(context.run_config["out"])), Path(str(context.run_config["eval-path"]))


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    cfg, out, eval_path = run_config(context)
    (algorithm,) = cfg.experiment.algorithms
    work = RunFolder(work_folder(out))
    work.root.mkdir(parents=True, exist_ok=True)
    write_json(work.config, cfg.to_dict())
    source = resolve_model(cfg.model)
    bench = Workbench(source, cfg)
    held_out = load_client_records(eval_path, cfg.data).dataset  # the coordinator's own file
    eval_set = build_eval_set(held_out, bench.tokenizer, cfg.data)
    base = bench.evaluate_base(eval_set).metrics()
    server = FederatedServer(
        cfg, bench, eval_set, algorithm, cfg.partition.clients, work.round_checkpoint(algorithm)
    )
    if server.remaining:
        server.start(grid)
    result = server.result()
    ctx = RunContext(
        config=cfg,
        model=source.description,
        base=base,
        partition_stats=_clients_seen(result.rounds[0].clients),
        adapter_bytes=adapter_nbytes(bench.initial),
    )
    spec = ALGORITHMS.get(algorithm)
    write_run(work.root, spec, result, ctx, bench.save, time.perf_counter() - started)
    shutil.rmtree(work.checkpoints, ignore_errors=True)
    work.finish()


def _clients_seen(clients: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the server knows of the clients' data: how many records each trained on."""
    seen = [c for c in clients if "client" in c]
    return [
        {"client": int(c["client"]), "size": int(c.get("num-examples", 0)), "labels": {}}
        for c in sorted(seen, key=lambda c: int(c["client"]))
    ]


def _client_spec(context: Context) -> ClientSpec:
    cfg, _, _ = run_config(context)
    node = context.node_config
    (algorithm,) = cfg.experiment.algorithms
    return ClientSpec(
        config=cfg,
        source=resolve_model(cfg.model),
        partitions_dir="",
        algorithm=algorithm,
        clients_dir=str(node.get("state-dir", "silotune-client")),
        data_path=str(node["data-path"]),
        eval_path=str(node.get("eval-path", "")),
    )


client_app = make_client_app(_client_spec)
