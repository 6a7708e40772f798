"""The `[privacy]` section: record-level differential privacy, its accounting and its audit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from silotune.errors import ConfigError

PrivacyMode = Literal["off", "dp-sgd"]
Accountant = Literal["rdp", "prv"]


@dataclass(frozen=True)
class PrivacyConfig:
    """Record-level DP: DP-SGD on what leaves a client, the per-client ledger and the budget."""

    # "dp-sgd": the adapter a client shares trains with per-example clipping and Gaussian noise
    # (Opacus), on Poisson-sampled batches; "off": nothing is noised (the ledger says ε = ∞).
    mode: PrivacyMode = "off"
    clip_norm: float = 1.0  # each example's gradient over the trainable adapter, L2
    # Noise std = noise_multiplier x clip_norm. 0 with a target_epsilon: calibrated so that the
    # planned rounds x local steps reach target_epsilon at delta.
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0  # 0: not set
    delta: float = 0.0  # 0: 1 / (10 x the client's records)
    max_epsilon: float = 0.0  # > 0: a client whose next round would pass it stops taking part
    accountant: Accountant = "rdp"  # Opacus's RDP or PRV accountant
    # false: the mechanisms' noise and samples are seeded from the OS's CSPRNG, unknown to all;
    # true: from experiment.seed, so a run replays exactly, and anyone with the config can
    # subtract the noise: the ledger then gives every noised release ε = ∞.
    replayable_noise: bool = False
    # The canary audit: `canaries` random secret records, each put into client `audit_client`'s
    # data with probability 1/2; after each algorithm, an empirical ε lower bound from them.
    audit: bool = False
    canaries: int = 100
    audit_client: int = 0
    # In/out guesses the auditor makes (half each) on the top and bottom scores; 0: all canaries.
    audit_guesses: int = 0

    def __post_init__(self) -> None:
        if self.mode == "dp-sgd" and self.noise_multiplier == 0 and self.target_epsilon == 0:
            raise ConfigError(
                "privacy.mode = dp-sgd needs privacy.noise_multiplier > 0 or a "
                "privacy.target_epsilon > 0"
            )
        if self.max_epsilon > 0 and self.mode != "dp-sgd":
            raise ConfigError(
                "privacy.max_epsilon is a budget on DP-SGD's ε: set privacy.mode = dp-sgd (without "
                "DP every release has ε = ∞)"
            )
        if self.delta >= 1.0:
            raise ConfigError(f"privacy.delta must be below 1, got {self.delta}")
        if self.audit_guesses > self.canaries:
            raise ConfigError(
                f"privacy.audit_guesses ({self.audit_guesses}) cannot exceed privacy.canaries "
                f"({self.canaries}): the auditor guesses on canaries"
            )


PRIVACY_MINIMUMS: dict[tuple[str, str], tuple[float, bool]] = {
    ("privacy", "clip_norm"): (0.0, False),
    ("privacy", "noise_multiplier"): (0.0, True),
    ("privacy", "target_epsilon"): (0.0, True),
    ("privacy", "delta"): (0.0, True),
    ("privacy", "max_epsilon"): (0.0, True),
    ("privacy", "canaries"): (2, True),
    ("privacy", "audit_client"): (0, True),
    ("privacy", "audit_guesses"): (0, True),
}
