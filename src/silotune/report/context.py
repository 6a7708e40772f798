"""Facts about an experiment that every run folder and report repeats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from silotune.config import Config


@dataclass(frozen=True)
class RunContext:
    """The config, the base model and its held-out metrics, and the data split."""

    config: Config
    model: str
    base: dict[str, float]
    partition_stats: list[dict[str, Any]]
    adapter_bytes: int
    data_rows: dict[str, Any] = field(default_factory=dict)  # source rows, dropped by reason
