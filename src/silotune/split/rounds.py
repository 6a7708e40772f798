"""A split client's per-round record: a line of its `rounds.jsonl`, read by whoever launched it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROUNDS_FILE = "rounds.jsonl"


@dataclass(frozen=True)
class ClientRound:
    """One finished round of one split client."""

    round: int
    metrics: dict[str, float]  # held-out metrics of the client's model after the round
    train_loss: float
    train_s: float
    wall_s: float
    # Since the client connected (cumulative): the launcher takes the differences per round.
    bytes_up: int
    bytes_down: int

    def to_json(self) -> dict[str, Any]:
        """The JSON object written as one line of rounds.jsonl."""
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> ClientRound:
        """Inverse of to_json."""
        return cls(
            round=int(row["round"]),
            metrics=dict(row["metrics"]),
            train_loss=float(row["train_loss"]),
            train_s=float(row["train_s"]),
            wall_s=float(row["wall_s"]),
            bytes_up=int(row["bytes_up"]),
            bytes_down=int(row["bytes_down"]),
        )


def read_rounds(client_dir: Path) -> list[ClientRound]:
    """The rounds a client has finished so far (none before it has started)."""
    path = client_dir / ROUNDS_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ClientRound.from_json(json.loads(line)) for line in lines if line.strip()]
