"""What one client does in one federated round, as plain Python (no Flower types).

The ClientApp translates Flower messages into a LocalRequest, looks the algorithm's LocalRole up
in LOCAL_ROLES, and translates the LocalReply back. `store` is the client's own persistent state
(Flower's Context.state in simulation): whatever an algorithm keeps there never leaves the client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from silotune.config import Config
from silotune.data.synthetic import Record
from silotune.evaluation.evaluator import EvalResult, EvalSet
from silotune.modeling.adapters import StateDict
from silotune.registry import Registry
from silotune.training.loop import Examples
from silotune.training.workbench import Workbench

MetricValue = int | float


@dataclass
class LocalRequest:
    """One client's view of a round."""

    bench: Workbench
    config: Config
    client: int
    round: int
    global_state: StateDict
    store: dict[str, StateDict]
    records: list[Record]
    examples: Examples
    client_dir: Path
    proximal_mu: float = 0.0


@dataclass
class LocalReply:
    """What goes back to the server: the upload, its aggregation weight, and metrics."""

    upload: StateDict
    weight: int
    metrics: dict[str, MetricValue] = field(default_factory=dict)


@dataclass(frozen=True)
class LocalRole:
    """A federated algorithm's client side: its training round, optionally its own evaluation."""

    train: Callable[[LocalRequest], LocalReply]
    evaluate: Callable[[LocalRequest, EvalSet], EvalResult] | None = None
    needs_private_slot: bool = False


LOCAL_ROLES: Registry[LocalRole] = Registry("client role")
