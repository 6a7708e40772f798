"""What leaves a client derived from its records (a mechanism), and what one use of a
mechanism cost, as the accountant composes it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

# What leaves a client, derived from its records, and so needs an ε:
# - "adapter": the adapter it uploads or sends for averaging (DP-SGD trained, or not private);
# - "activations": a split client's front activations; "gradients": the gradients it returns;
# - "synthetic": FedPIT's synthetic data (its generator saw real records: not private yet);
# - "records": the records themselves (pooled for centralized training);
# - "evaluation": scores and generations a client computes with a model its records trained
#   without DP and sends for the report (FedPIT's own held-out evaluation, private adapter on);
# - "central": Flower's server-side or client-side DP on the averaged update (user level).
Mechanism = Literal[
    "adapter", "activations", "gradients", "synthetic", "records", "evaluation", "central"
]
MECHANISMS: tuple[Mechanism, ...] = (
    "adapter",
    "activations",
    "gradients",
    "synthetic",
    "records",
    "evaluation",
    "central",
)

# Released by a client's one training loop, from the same Poisson-sampled batches at the same
# steps (split: the activations and gradients of each step's batch, and the adapter trained on
# it): within a round they are one mechanism (see `joint`), not independent ones.
ONE_LOOP: frozenset[Mechanism] = frozenset({"adapter", "activations", "gradients"})
# Released row by row, one row per sampled record: whoever sees them sees which records a step
# sampled, so neither they nor anything else on those batches is amplified by the sampling.
WIRE: frozenset[Mechanism] = frozenset({"activations", "gradients"})

# What an algorithm lets out of its clients, per mechanism: None when its uses are accounted from
# the clients' reports, else the reason it has no guarantee.
Releases = dict[Mechanism, str | None]


@dataclass(frozen=True)
class GaussianUse:
    """`steps` runs of a Gaussian mechanism (noise std = noise_multiplier x the clip norm) on a
    Poisson subsample: each record is in a step's batch with probability `sample_rate`."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def metrics(self, mechanism: Mechanism) -> dict[str, float]:
        """How a client reports this use of `mechanism` among its round's metrics."""
        return {
            f"dp-{mechanism}-noise-multiplier": self.noise_multiplier,
            f"dp-{mechanism}-sample-rate": self.sample_rate,
            f"dp-{mechanism}-steps": float(self.steps),
        }

    @classmethod
    def reported(cls, mechanism: Mechanism, metrics: Mapping[str, object]) -> GaussianUse | None:
        """The use of `mechanism` a client's metrics report (see `metrics`); None if none."""
        keys = [f"dp-{mechanism}-{k}" for k in ("noise-multiplier", "sample-rate", "steps")]
        values = [metrics.get(k) for k in keys]
        if not all(isinstance(v, int | float) for v in values):
            return None
        sigma, rate, steps = (float(v) for v in values)  # type: ignore[arg-type]
        return cls(sigma, rate, int(steps))


def joint(uses: Sequence[GaussianUse]) -> GaussianUse:
    """Gaussian mechanisms that ran on the same batches at the same steps, as the one they are.

    Releasing each clipped output with noise sigma_i x its clip norm shifts, between neighbouring
    datasets, a Gaussian by at most sqrt(sum 1/sigma_i²) noise standard deviations: exactly one
    Gaussian mechanism with 1/sigma² = sum 1/sigma_i², subsampled once (the batch is shared).
    """
    if not uses:
        raise ValueError("joint of no mechanism")
    rates, steps = {u.sample_rate for u in uses}, {u.steps for u in uses}
    if len(rates) != 1 or len(steps) != 1:
        raise ValueError(f"mechanisms on the same batches must share rate and steps: {uses}")
    if any(u.noise_multiplier == 0 for u in uses):
        sigma = 0.0
    else:
        sigma = 1 / math.sqrt(sum(u.noise_multiplier**-2 for u in uses))
    return GaussianUse(sigma, rates.pop(), steps.pop())
