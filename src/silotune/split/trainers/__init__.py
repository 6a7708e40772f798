"""How the split server trains its middle for many clients: serial, batch-parallel, per-client."""

from __future__ import annotations

from silotune.config import Config
from silotune.split.segments import Middle
from silotune.split.trainers import batch, per_client, serial
from silotune.split.trainers.base import (
    TRAINERS,
    MiddleTrainer,
    StepDropped,
    adapter_state,
    load_state,
    trainable,
)

__all__ = [
    "TRAINERS",
    "MiddleTrainer",
    "StepDropped",
    "adapter_state",
    "batch",
    "build_trainer",
    "load_state",
    "per_client",
    "serial",
    "trainable",
]


def build_trainer(middle: Middle, config: Config) -> MiddleTrainer:
    """The trainer for `config.split.mode`."""
    return TRAINERS.get(config.split.mode)(middle, config)
