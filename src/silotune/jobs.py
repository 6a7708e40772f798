"""What every algorithm receives (a Job) and returns (an AlgorithmResult), and their registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from silotune.config import Config
from silotune.data.partition import Partitions
from silotune.data.synthetic import SyntheticStats
from silotune.evaluation.evaluator import EvalSet
from silotune.evaluation.intervals import PerRecord
from silotune.evaluation.judge import JudgeResult
from silotune.modeling.adapters import StateDict
from silotune.modeling.load import ModelSource
from silotune.modeling.memory import WORKLOADS, Process
from silotune.privacy.mechanisms import Releases
from silotune.registry import Registry
from silotune.run_folder import RunFolder
from silotune.training.loop import Examples
from silotune.training.workbench import Workbench

Mode = Literal["federated", "local", "centralized", "split"]


@dataclass
class Job:
    """Everything an algorithm needs: config, data (already split and tokenised), model, folders."""

    config: Config
    source: ModelSource
    split: Partitions
    client_examples: list[Examples]
    eval_set: EvalSet
    workbench: Workbench
    run: RunFolder  # partitions, clients' disks (in simulation), checkpoints, split processes
    # Flower simulation's per-client resources, from the memory plan (None: one at a time).
    client_resources: dict[str, float] | None = None
    on_round: Callable[[RoundLog], None] = lambda _: None
    verbose: bool = False


@dataclass
class RoundLog:
    """One round of one algorithm: held-out metrics, training and traffic."""

    round: int
    metrics: dict[str, float]
    train_loss: float
    bytes_up: int = 0  # as serialised in the messages
    bytes_down: int = 0
    tensor_bytes_up: int = 0  # raw tensor data within them
    tensor_bytes_down: int = 0
    wall_s: float = 0.0
    clients: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The line written to metrics.jsonl."""
        return {
            "round": self.round,
            **self.metrics,
            "train_loss": self.train_loss,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "tensor_bytes_up": self.tensor_bytes_up,
            "tensor_bytes_down": self.tensor_bytes_down,
            "wall_s": round(self.wall_s, 3),
            "clients": self.clients,
        }

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> RoundLog:
        """Inverse of to_json."""
        traffic = ("bytes_up", "bytes_down", "tensor_bytes_up", "tensor_bytes_down", "wall_s")
        fixed = {"round", "train_loss", "clients", *traffic}
        return cls(
            round=int(row["round"]),
            metrics={k: float(v) for k, v in row.items() if k not in fixed},
            train_loss=float(row["train_loss"]),
            clients=list(row.get("clients", [])),
            **{k: row[k] for k in traffic if k in row},
        )


@dataclass
class AlgorithmResult:
    """What a finished algorithm hands to the report writer."""

    rounds: list[RoundLog]
    adapters: dict[str, StateDict]
    # With it, `adapters` are named as PEFT saves them and form folders with this
    # adapter_config.json; without, they are the run's own LoRA (written through its model).
    adapter_config: dict[str, Any] | None = None
    per_client_final: list[dict[str, float]] = field(default_factory=list)
    samples: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    synthetic: SyntheticStats | None = None
    # Held-out generations of each final model (one list per model: 1, or one per client).
    final_predictions: list[list[str]] = field(default_factory=list)
    judge: JudgeResult | None = None
    # Per held-out record, the scores of the model(s) whose metrics are `final` (a record-wise
    # mean where `final` is a mean over clients' models); empty when unknown.
    final_per_record: PerRecord = field(default_factory=dict)
    # Every client's final model on every client's own held-out records (see
    # silotune.evaluation.per_client); empty without partition.client_eval_size.
    per_client_eval: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        """Held-out metrics after the last round."""
        return self.rounds[-1].metrics

    def bytes(self) -> dict[str, int]:
        """Total traffic over all rounds."""
        keys = ("bytes_up", "bytes_down", "tensor_bytes_up", "tensor_bytes_down")
        return {k: sum(getattr(r, k) for r in self.rounds) for k in keys}


@dataclass(frozen=True)
class AlgorithmSpec:
    """A registered algorithm with every trait the rest of silotune asks about."""

    name: str
    mode: Mode
    description: str
    run: Callable[[Job], AlgorithmResult]
    # The processes it starts (or model copies it adds) and what each holds, for the memory plan.
    processes: Callable[[Config], tuple[Process, ...]]
    # What leaves its clients derived from their records, for the privacy ledger: per mechanism,
    # None (accounted from the clients' reports) or why it has no DP guarantee.
    releases: Callable[[Config], Releases]
    shared_adapter: bool = False  # every participant ends with the same adapter (attack target)
    deployable: bool = False  # runs as a Flower app under the Deployment Engine
    adapters: int = 1  # adapters each client trains (FedPIT: global + private)
    # The largest weight one client sends, from the config and each client's example count:
    # SecAgg+ must not scale an upload up before Flower's clip. None: the largest count.
    weight_bound: Callable[[Config, list[int]], float] | None = None
    check: Callable[[Config], None] | None = None  # refuses settings this algorithm cannot run

    def max_weight(self, config: Config, client_examples: list[int]) -> float:
        """The largest weight one client can send."""
        if self.weight_bound is not None:
            return self.weight_bound(config, client_examples)
        return float(max(client_examples))


ALGORITHMS: Registry[AlgorithmSpec] = Registry("algorithm")


def register(
    name: str,
    mode: Mode,
    description: str,
    *,
    processes: Callable[[Config], tuple[Process, ...]],
    releases: Callable[[Config], Releases],
    shared_adapter: bool = False,
    deployable: bool = False,
    adapters: int = 1,
    weight_bound: Callable[[Config, list[int]], float] | None = None,
    check: Callable[[Config], None] | None = None,
) -> Callable[[Callable[[Job], AlgorithmResult]], Callable[[Job], AlgorithmResult]]:
    """Decorator registering `fn(job) -> AlgorithmResult` as algorithm `name`, with its traits."""

    def add(fn: Callable[[Job], AlgorithmResult]) -> Callable[[Job], AlgorithmResult]:
        spec = AlgorithmSpec(
            name,
            mode,
            description,
            fn,
            processes,
            releases,
            shared_adapter=shared_adapter,
            deployable=deployable,
            adapters=adapters,
            weight_bound=weight_bound,
            check=check,
        )
        ALGORITHMS.register(name)(spec)
        WORKLOADS.register(name)(processes)  # the memory plan reads it without this module
        return fn

    return add


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of metric dicts that share their keys."""
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
