"""Screen client replies before aggregation: one bad reply must never reach the global adapter.

A reply is rejected when it holds other records than the one adapter and the one metric record
the server reads; when its metric keys differ from the round's other replies, or a metric is a
list; when its weight (`num-examples`, or `dp-weight` with DP) is not a finite number above 0,
differs from what the server knows the client holds or, where it knows nothing, exceeds
`max_weight_ratio` x the round's median weight; or when its adapter's tensor names or shapes
differ from what the server sent, it is not floating point, or it holds NaN or Inf. Rejections
are recorded per round with the client and the reason; the rest are aggregated as usual.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict


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
        return "wrong tensor names: " + _key_difference(names, expected)
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


@dataclass(frozen=True)
class Expected:
    """What the server expects of every train reply of a round."""

    arrays: str  # name of the one ArrayRecord
    metrics: str  # name of the one MetricRecord
    weight: str  # the metric that weighs the update
    layout: Layout | None
    max_weight_ratio: float
    # The weight each client must report, where the server knows it (simulation: partition
    # sizes by client id); empty: unknown.
    weights: Mapping[int, float] = field(default_factory=dict)


def screen_round(contents: Sequence[RecordDict], expected: Expected) -> list[str | None]:
    """Why each of a round's replies cannot be aggregated (None where it can)."""
    reasons = [_screen_one(content, expected) for content in contents]
    ok = [i for i, reason in enumerate(reasons) if reason is None]
    metrics = {i: contents[i].metric_records[expected.metrics] for i in ok}
    # Honest clients all send the same keys: the most common set is the round's (with no
    # majority, the first reply's), as an honest majority is assumed throughout.
    common = Counter(frozenset(m.keys()) for m in metrics.values()).most_common(1)
    for i, record in metrics.items():
        if keys := _key_difference(set(record.keys()), set(common[0][0])):
            reasons[i] = f"metric keys differ from the other clients': {keys}"
    weights = {i: _number(m[expected.weight]) for i, m in metrics.items() if reasons[i] is None}
    # Weights checked against what the server knows need no bound: a skewed partition is honest.
    if weights and not expected.weights:
        bound = expected.max_weight_ratio * statistics.median(weights.values())
        for i, weight in weights.items():
            if weight > bound:
                reasons[i] = (
                    f"{expected.weight} = {weight:g} is above federated.max_weight_ratio x the "
                    f"round's median weight ({bound:g})"
                )
    return reasons


def _screen_one(content: RecordDict, expected: Expected) -> str | None:
    """Why one reply, on its own, cannot be aggregated (None when it can)."""
    names = set(content.keys())
    if keys := _key_difference(names, {expected.arrays, expected.metrics}):
        return f"wrong records: {keys}"
    arrays, metrics = content[expected.arrays], content[expected.metrics]
    if not isinstance(arrays, ArrayRecord) or not isinstance(metrics, MetricRecord):
        return f"{expected.arrays!r} must be an ArrayRecord and {expected.metrics!r} a MetricRecord"
    if listed := sorted(k for k, v in metrics.items() if isinstance(v, list)):
        return f"metric {_few(listed)} is a list, expected a number"
    if reason := _screen_weight(metrics, expected):
        return reason
    return screen(arrays, expected.layout)


def _screen_weight(metrics: MetricRecord, expected: Expected) -> str | None:
    if expected.weight not in metrics:
        return f"no {expected.weight!r} metric"
    weight = _number(metrics[expected.weight])
    if not math.isfinite(weight) or weight <= 0:
        return f"{expected.weight} = {weight:g}, expected a finite number above 0"
    if expected.weights:
        client = _number(metrics.get("client"))
        known = expected.weights.get(int(client)) if client.is_integer() else None
        if known is None:
            return f"client id {client:g} is not one of this run's clients"
        if weight != known:
            return f"{expected.weight} = {weight:g}, but client {client:g}'s data gives {known:g}"
    return None


def _number(value: object) -> float:
    """A scalar metric as a float (lists were screened out before)."""
    return float(value) if isinstance(value, int | float) else math.nan


def _key_difference(got: set[str], expected: set[str]) -> str:
    """'missing a, unknown b' (empty when the sets are equal)."""
    missing, extra = sorted(expected - got), sorted(got - expected)
    parts = [f"missing {_few(missing)}"] if missing else []
    parts += [f"unknown {_few(extra)}"] if extra else []
    return ", ".join(parts)
