"""The Flower ClientApp: translate messages to a LocalRequest for the algorithm's client role.

Thin on purpose: what a client does lives in plain modules (`LOCAL_ROLES`). The frozen base model
is loaded once per worker process (see Workbench); adapters are replaced from every message and
from the client's own state, so nothing of one client stays in the model for the next. The
client's state lives in Flower's Context.state and, after every round, on the client's own disk,
from which a restarted client (or a resumed run) takes it up again.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from silotune import progress
from silotune.checkpoint import load_client_state, save_client_state
from silotune.config import Config
from silotune.data.load import as_records, load_client_records
from silotune.data.sft import tokenize_dataset
from silotune.data.synthetic import Record
from silotune.defences.federated import EQUAL_WEIGHT, train_mods
from silotune.evaluation.evaluator import EvalSet, build_eval_set
from silotune.federated import secagg
from silotune.federated.local import LOCAL_ROLES, LocalRequest
from silotune.federated.metering import (
    ARRAYS,
    BASE_FINGERPRINT,
    BASE_MODEL,
    METRICS,
    PER_RECORD,
    PREDICTIONS,
)
from silotune.federated.uploads import OWN_ADAPTER, UploadPlan
from silotune.modeling.load import ModelSource
from silotune.privacy import budget
from silotune.privacy.mechanisms import GaussianUse
from silotune.records import load_store, record_to_adapter, save_store
from silotune.run_folder import client_adapter_dir, client_name, eval_file, partition_file
from silotune.training.loop import Examples
from silotune.training.workbench import Workbench


@dataclass(frozen=True)
class ClientSpec:
    """What every client of a run shares: config, base model, algorithm, where data lives.

    In simulation client N reads partitions_dir/client-N.jsonl; a deployed node names its own
    files instead (`data_path`, `eval_path`), which no other node can see.
    """

    config: Config
    source: ModelSource
    partitions_dir: str
    algorithm: str
    clients_dir: str
    data_path: str = ""
    eval_path: str = ""
    progress_dir: str = ""  # where a simulated client's progress goes (see silotune.progress)


@cache
def _workbench(spec: ClientSpec) -> Workbench:
    private = LOCAL_ROLES.get(spec.algorithm).needs_private_slot
    return Workbench(spec.source, spec.config, private=private)


@cache
def _local_data(spec: ClientSpec, partition_id: int) -> tuple[list[Record], Examples]:
    path = spec.data_path or partition_file(spec.partitions_dir, partition_id)
    # A deployed node's file is the user's own: the loader maps its fields and screens its rows.
    dataset = load_client_records(Path(path), spec.config.data).dataset
    data = spec.config.data
    examples = tokenize_dataset(
        dataset, _workbench(spec).tokenizer, data.prompt_style, data.max_length
    )
    return as_records(dataset), examples


@cache
def _eval_set(spec: ClientSpec) -> EvalSet:
    if not spec.data_path:
        path = eval_file(spec.partitions_dir)
    elif spec.eval_path:
        path = Path(spec.eval_path)
    else:
        raise ValueError(f"{spec.algorithm} clients evaluate: give the node an eval-path")
    dataset = load_client_records(path, spec.config.data).dataset
    return build_eval_set(dataset, _workbench(spec).tokenizer, spec.config.data)


def _request(spec: ClientSpec, msg: Message, context: Context) -> LocalRequest:
    partition_id = _as_int(context.node_config["partition-id"])
    config = msg.content.config_records["config"]
    records, examples = _local_data(spec, partition_id)
    round_ = _as_int(config["server-round"])
    _check_same_model(_workbench(spec), config, partition_id)
    client_dir = Path(spec.clients_dir) / client_name(partition_id)
    # A fresh process (restarted client, resumed run) takes its state up from its own disk:
    # before training round R, as it was after round R - 1; when evaluating, after round R.
    upto = round_ - 1 if msg.metadata.message_type == MessageType.TRAIN else round_
    store = load_store(context.state) or load_client_state(client_dir, upto)
    plan = UploadPlan.of(spec.config)
    # A client of a lower rank (lora.client_ranks) trains the first components only; a FedSA
    # client puts its own B under the shared A.
    adapter, correction = plan.split(record_to_adapter(msg.content.array_records[ARRAYS]))
    _workbench(spec).set_correction(correction)  # FedEx: frozen, beside `global`
    received = plan.receive(adapter, partition_id)
    own = {}
    if plan.a_only:  # its B from its state; before its first round, the initial one
        own = store.get(OWN_ADAPTER) or plan.receive(_workbench(spec).initial, partition_id)
    return LocalRequest(
        bench=_workbench(spec),
        config=spec.config,
        client=partition_id,
        round=round_,
        global_state=plan.whole(received, own),
        store=store,
        records=records,
        examples=examples,
        client_dir=client_dir,
        proximal_mu=_as_float(config.get("proximal-mu", 0.0)),
    )


def make_client_app(spec: ClientSpec | Callable[[Context], ClientSpec]) -> ClientApp:
    """A ClientApp running the algorithm's client role on its node's data.

    `spec` is fixed in simulation; a deployed app reads it from each message's Context (the run
    config and the node's own config) and then takes no client mods (no DP clipping, no SecAgg+).
    """
    app = ClientApp()
    mods = []
    if isinstance(spec, ClientSpec):
        fixed = spec
        mods = train_mods(spec.config.defence)
        if spec.config.defence.secagg:
            # Flower's SecAgg+ masks the reply; the handler still sees our own message layout.
            shared = UploadPlan.of(spec.config).shared  # FedSA: only A is summed
            mods += secagg.client_mods(lambda: shared(_workbench(fixed).initial))

    def spec_of(context: Context) -> ClientSpec:
        return spec if isinstance(spec, ClientSpec) else spec(context)

    @app.train(mods=mods)
    def train(msg: Message, context: Context) -> Message:
        spec = spec_of(context)
        role = LOCAL_ROLES.get(spec.algorithm)
        req = _request(spec, msg, context)
        try:
            budget.check_round(spec.config, req.store, len(req.examples))
        except budget.BudgetSpent:  # released nothing: the server records the decline
            declined = MetricRecord({"client": req.client, budget.DECLINED: 1})
            return Message(content=RecordDict({METRICS: declined}), reply_to=msg)
        with _reporting(spec, req):
            reply = role.train(req)
        plan = UploadPlan.of(spec.config)
        if plan.a_only:  # FedSA: the B matrices stay here
            req.store[OWN_ADAPTER] = plan.own(reply.upload)
        if (use := GaussianUse.reported("adapter", reply.metrics)) is not None:
            budget.record(req.store, use)
        save_store(context.state, req.store)
        save_client_state(req.client_dir, req.round, req.store)
        metrics = MetricRecord(
            {"num-examples": reply.weight, EQUAL_WEIGHT: 1, "client": req.client, **reply.metrics}
        )
        upload = plan.send(reply.upload, req.global_state)
        content = RecordDict({ARRAYS: upload, METRICS: metrics})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        spec = spec_of(context)
        role = LOCAL_ROLES.get(spec.algorithm)
        shared_a = UploadPlan.of(spec.config).a_only
        if role.evaluate is None and not shared_a:
            raise RuntimeError(f"{spec.algorithm} clients do not evaluate locally")
        req = _request(spec, msg, context)
        eval_set = _eval_set(spec)
        with _reporting(spec, req):
            if role.evaluate is not None:
                result = role.evaluate(req, eval_set)
            else:  # FedSA: the shared A with this client's own B
                result = req.bench.evaluate(req.global_state, eval_set, round_=req.round)
        if shared_a:  # what this client infers with, on its own disk
            target = client_adapter_dir(req.client_dir, OWN_ADAPTER)
            target.parent.mkdir(parents=True, exist_ok=True)
            req.bench.save(req.global_state, target)
        metrics = MetricRecord(
            {
                "num-examples": len(eval_set.examples),
                EQUAL_WEIGHT: 1,
                "client": req.client,
                **result.metrics(),
            }
        )
        # Generations on the shared held-out set (not on private data), for the judge.
        predictions = ConfigRecord({"text": result.predictions})
        # Each held-out record's scores, for the paired intervals (shared records, not private).
        scores = ConfigRecord({k: list(v) for k, v in result.per_record.items()})
        content = RecordDict({METRICS: metrics, PREDICTIONS: predictions, PER_RECORD: scores})
        return Message(content=content, reply_to=msg)

    return app


def _reporting(spec: ClientSpec, req: LocalRequest) -> AbstractContextManager[None]:
    """A simulated client tells the run's progress display what it does; a deployed node's
    progress stays in its own logs."""
    if not spec.progress_dir:
        return nullcontext()
    return progress.reporting(Path(spec.progress_dir), f"client {req.client}")


class ModelMismatchError(RuntimeError):
    """The server's base model or adapter layout is not this client's."""


def _check_same_model(bench: Workbench, config: ConfigRecord, client: int) -> None:
    theirs = config.get(BASE_FINGERPRINT)
    if theirs is None:  # evaluation messages and SecAgg+ carry none
        return
    ours = bench.fingerprint()
    if theirs != ours:
        raise ModelMismatchError(
            f"client {client} has base model {bench.description} with adapter fingerprint "
            f"{ours}; the server has {config.get(BASE_MODEL)!s} with {theirs!s}. Both sides need "
            "the same [model] files and [lora] settings"
        )


def _as_int(value: object) -> int:
    if not isinstance(value, int | float | str):
        raise TypeError(f"expected a number, got {value!r}")
    return int(value)


def _as_float(value: object) -> float:
    if not isinstance(value, int | float | str):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)
