"""What leaves a client derived from its records (a mechanism), and what one use of a
mechanism cost, as the accountant composes it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

# What leaves a client, derived from its records, and so needs an ε:
# - "adapter": the adapter it uploads or sends for averaging (DP-SGD trained, or not private);
# - "activations": a split client's front activations; "gradients": the gradients it returns;
# - "synthetic": FedPIT's synthetic data (its generator saw real records: not private yet);
# - "records": the records themselves (pooled for centralized training);
# - "central": Flower's server-side or client-side DP on the averaged update (user level).
Mechanism = Literal["adapter", "activations", "gradients", "synthetic", "records", "central"]
MECHANISMS: tuple[Mechanism, ...] = (
    "adapter",
    "activations",
    "gradients",
    "synthetic",
    "records",
    "central",
)

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
