"""Screen client updates before aggregation: one bad reply must never reach the global adapter.

An update is rejected when its tensor names or shapes differ from the adapter the server sent,
when it is not a floating-point tensor, or when it holds NaN or Inf. Rejections are recorded per
round with the client and the reason; the remaining updates are aggregated as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord


@dataclass(frozen=True)
class Layout:
    """Tensor names and shapes of the adapter a round sent out."""

    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, record: ArrayRecord) -> Layout:
        """The layout of `record`."""
        return cls({name: tuple(array.shape) for name, array in record.items()})


def screen(update: ArrayRecord | None, layout: Layout | None) -> str | None:
    """Why `update` cannot be aggregated against `layout` (when known), or None when it can."""
    if update is None:
        return "no adapter in the reply"
    names = set(update.keys())
    expected = set(layout.shapes) if layout else names
    if names != expected:
        missing, extra = sorted(expected - names), sorted(names - expected)
        parts = [f"missing {_few(missing)}"] if missing else []
        parts += [f"unknown {_few(extra)}"] if extra else []
        return "wrong tensor names: " + ", ".join(parts)
    for name, array in update.items():
        if layout and tuple(array.shape) != layout.shapes[name]:
            return f"{name} has shape {tuple(array.shape)}, expected {layout.shapes[name]}"
        values = array.numpy()
        if not np.issubdtype(values.dtype, np.floating):
            return f"{name} has dtype {values.dtype}, expected a floating-point tensor"
        if not np.isfinite(values).all():
            return f"{name} holds NaN or Inf"
    return None


def _few(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
