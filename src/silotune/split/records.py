"""What the split processes report: a client's rounds and final report, the server's summary.

Each is a dataclass written as JSON into the process's output folder (`run_folder.SplitOutputs`)
and read back typed by whoever launched the process.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from silotune.run_folder import SplitOutputs, write_json


@dataclass
class LinkStats:
    """What the link cost a client: bytes, and where the seconds went."""

    bytes_up: int = 0
    bytes_down: int = 0
    frames: int = 0
    serialize_s: float = 0.0  # framing + (de)serialisation, crypto excluded
    wait_s: float = 0.0  # from request sent to reply received
    server_s: float = 0.0  # of which the server computed
    crypto_s: float = 0.0  # sealing and opening frames (filled in for the report)


@dataclass
class ClientStats:
    """What one client's session cost the server."""

    frames_in: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    crypto_s: float = 0.0
    rejected: int = 0
    finished: bool = False


@dataclass(frozen=True)
class ClientRound:
    """One finished round of one split client: a line of its rounds.jsonl."""

    round: int
    metrics: dict[str, float]  # held-out metrics of the client's model after the round
    train_loss: float
    train_s: float
    wall_s: float
    bytes_up: int  # this round's traffic (the first round's includes the handshake)
    bytes_down: int

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> ClientRound:
        """Inverse of asdict."""
        return cls(
            round=int(row["round"]),
            metrics=dict(row["metrics"]),
            train_loss=float(row["train_loss"]),
            train_s=float(row["train_s"]),
            wall_s=float(row["wall_s"]),
            bytes_up=int(row["bytes_up"]),
            bytes_down=int(row["bytes_down"]),
        )


def append_round(outputs: SplitOutputs, row: ClientRound) -> None:
    """Add a finished round to the client's progress file."""
    with outputs.rounds.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(asdict(row)) + "\n")


def checkpointed_round(outputs: SplitOutputs) -> int | None:
    """The round a client's checkpoint holds (None: it has saved none)."""
    if not (outputs.checkpoint.is_file() and outputs.checkpoint_round.is_file()):
        return None
    return int(json.loads(outputs.checkpoint_round.read_text())["round"])


def read_rounds(outputs: SplitOutputs) -> list[ClientRound]:
    """The rounds a client has finished so far (none before it has started)."""
    if not outputs.rounds.exists():
        return []
    lines = outputs.rounds.read_text(encoding="utf-8").splitlines()
    return [ClientRound.from_json(json.loads(line)) for line in lines if line.strip()]


@dataclass(frozen=True)
class ClientReport:
    """A split client's final report (its result.json)."""

    client: str
    examples: int
    source_rows: int
    dropped: dict[str, int]  # rows left out of its data, by reason
    rounds: list[ClientRound]
    predictions: list[str]  # held-out generations of the final model
    samples: list[dict[str, str]]
    link: LinkStats
    per_record: dict[str, list[float]] = field(default_factory=dict)  # the final model's scores

    def write(self, outputs: SplitOutputs) -> None:
        """Write the report atomically."""
        data = asdict(self)
        data["data"] = {"source_rows": data.pop("source_rows"), "dropped": data.pop("dropped")}
        write_json(outputs.report, data)

    @classmethod
    def read(cls, outputs: SplitOutputs) -> ClientReport:
        """The report a finished client wrote."""
        data = json.loads(outputs.report.read_text(encoding="utf-8"))
        return cls(
            client=str(data["client"]),
            examples=int(data["examples"]),
            source_rows=int(data["data"]["source_rows"]),
            dropped={str(k): int(v) for k, v in data["data"]["dropped"].items()},
            rounds=[ClientRound.from_json(r) for r in data["rounds"]],
            predictions=list(data["predictions"]),
            samples=list(data["samples"]),
            link=LinkStats(**data["link"]),
            per_record=data.get("per_record", {}),  # absent from reports written before it
        )


@dataclass(frozen=True)
class ServerSummary:
    """The split server's summary (its server.json)."""

    mode: str
    steps: int
    compute_s: float  # in the middle's forward and backward passes
    wall_s: float
    clients: dict[str, ClientStats] = field(default_factory=dict)

    def write(self, outputs: SplitOutputs) -> None:
        """Write the summary atomically."""
        write_json(outputs.summary, asdict(self))

    @classmethod
    def read(cls, outputs: SplitOutputs) -> ServerSummary:
        """The summary a finished server wrote."""
        data = json.loads(outputs.summary.read_text(encoding="utf-8"))
        return cls(
            mode=str(data["mode"]),
            steps=int(data["steps"]),
            compute_s=float(data["compute_s"]),
            wall_s=float(data["wall_s"]),
            clients={str(c): ClientStats(**s) for c, s in data["clients"].items()},
        )
