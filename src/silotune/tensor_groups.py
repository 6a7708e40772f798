"""Groups of named tensors as one flat dict for a safetensors file, keyed `group::name`.

The key format of every checkpoint: federated rounds and results (silotune.checkpoint) and the
split server's training state (silotune.split.trainers.state).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import torch

SEP = "::"  # joins a group's path and a tensor name in one safetensors key

T = TypeVar("T")


def key(*parts: str) -> str:
    """One flat key from a group's path and a tensor name."""
    return SEP.join(parts)


def flatten(groups: Mapping[str, Mapping[str, T]]) -> dict[str, T]:
    """`{group: {name: tensor}}` as `{"group::name": tensor}`."""
    return {key(group, name): t for group, tensors in groups.items() for name, t in tensors.items()}


def unflatten(flat: Mapping[str, T]) -> dict[str, dict[str, T]]:
    """Inverse of flatten: each key split at its first separator."""
    groups: dict[str, dict[str, T]] = {}
    for name, tensor in flat.items():
        group, _, rest = name.partition(SEP)
        groups.setdefault(group, {})[rest] = tensor
    return groups


def group(flat: Mapping[str, T], *path: str) -> dict[str, T]:
    """The tensors under the group `path`, keyed by the rest of their key."""
    head = key(*path) + SEP
    return {k.removeprefix(head): v for k, v in flat.items() if k.startswith(head)}


def contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies, as safetensors writes them."""
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}
