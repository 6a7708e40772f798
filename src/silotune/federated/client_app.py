"""The Flower ClientApp: receive the global adapter, train it on this node's data, reply with it.

Thin on purpose: data loading and training live in plain modules. The frozen base model is
loaded once per worker process (see Workbench); the adapter is replaced from every message.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from silotune.config import Config
from silotune.data.load import load_partition_file
from silotune.data.sft import tokenize_dataset
from silotune.federated.strategies import ARRAYS, METRICS
from silotune.modeling.load import ModelSource
from silotune.records import adapter_to_record, record_to_adapter
from silotune.training.loop import Examples
from silotune.training.workbench import Workbench, derive_seed


@dataclass(frozen=True)
class ClientSpec:
    """What every client of a run shares: the config, the base model and where partitions are."""

    config: Config
    source: ModelSource
    partitions_dir: str


def partition_file(partitions_dir: str | Path, partition_id: int) -> Path:
    """Where client `partition_id` finds its own records."""
    return Path(partitions_dir) / f"client-{partition_id}.jsonl"


@cache
def _workbench(spec: ClientSpec) -> Workbench:
    return Workbench(spec.source, spec.config)


@cache
def _examples(spec: ClientSpec, partition_id: int) -> Examples:
    bench = _workbench(spec)
    records = load_partition_file(partition_file(spec.partitions_dir, partition_id))
    data = spec.config.data
    return tokenize_dataset(records, bench.tokenizer, data.prompt_style, data.max_length)


def make_client_app(spec: ClientSpec) -> ClientApp:
    """A ClientApp that runs the shared local training loop on its node's partition."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition_id = _as_int(context.node_config["partition-id"])
        config = msg.content.config_records["config"]
        server_round = _as_int(config["server-round"])
        bench = _workbench(spec)
        state, result = bench.train(
            record_to_adapter(msg.content.array_records[ARRAYS]),
            _examples(spec, partition_id),
            steps=spec.config.train.local_steps,
            seed=derive_seed(spec.config.experiment.seed, "client", partition_id, server_round),
            proximal_mu=_as_float(config.get("proximal-mu", 0.0)),
        )
        metrics = MetricRecord(
            {
                "num-examples": result.examples,
                "client": partition_id,
                "train_loss": result.loss,
                "train_s": result.seconds,
            }
        )
        reply = RecordDict({ARRAYS: adapter_to_record(state), METRICS: metrics})
        return Message(content=reply, reply_to=msg)

    return app


def _as_int(value: object) -> int:
    if not isinstance(value, int | float | str):
        raise TypeError(f"expected a number, got {value!r}")
    return int(value)


def _as_float(value: object) -> float:
    if not isinstance(value, int | float | str):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)
