"""The `[privacy]` section: record-level differential privacy, its accounting and its audit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from silotune.errors import ConfigError
from silotune.typed_values import setting

PrivacyMode = Literal["off", "dp-sgd"]
Accountant = Literal["rdp", "prv"]


@dataclass(frozen=True)
class PrivacyConfig:
    """Record-level DP: DP-SGD on what leaves a client, the per-client ledger and the budget."""

    mode: PrivacyMode = setting(
        "off",
        '"dp-sgd": the adapter a client shares trains with per-example clipping and Gaussian '
        'noise (Opacus), on Poisson-sampled batches; "off": nothing is noised (the ledger says '
        "ε = ∞).",
    )
    clip_norm: float = setting(
        1.0,
        "DP-SGD: the L2 norm each example's gradient over the trainable adapter is clipped to.",
    )
    noise_multiplier: float = setting(
        0.0,
        "DP-SGD: the noise's standard deviation as a multiple of `clip_norm`. 0 with a "
        "`target_epsilon`: calibrated so that the planned rounds × local steps reach "
        "`target_epsilon` at `delta`.",
    )
    target_epsilon: float = setting(
        0.0,
        "DP-SGD: the ε each client should reach over the planned run, from which the noise is "
        "calibrated when `noise_multiplier` is 0 (0: not set).",
    )
    delta: float = setting(
        0.0,
        "The δ of every record-level ε (the ledger's, DP-SGD's target, the audit's bound, "
        "`synthetic.dp_epsilon`), below 1; 0: 1 / (10 × the client's records).",
    )
    max_epsilon: float = setting(
        0.0,
        "> 0: a client whose next round would take its ε past this stops taking part (needs "
        "`mode` = dp-sgd; split learning refuses it). 0 = no budget.",
    )
    accountant: Accountant = setting(
        "rdp", 'How ε is counted: Opacus\'s RDP ("rdp") or PRV ("prv") accountant.'
    )
    replayable_noise: bool = setting(
        False,
        "false: the mechanisms' noise and samples are seeded from the OS's CSPRNG, unknown to "
        "all; true: from `experiment.seed`, so a run replays exactly, and anyone with the "
        "config can subtract the noise: the ledger then gives every noised release ε = ∞.",
    )
    audit: bool = setting(
        False,
        "The canary audit: `canaries` random secret records, each put into client "
        "`audit_client`'s data with probability 1/2; after each algorithm, an empirical ε "
        "lower bound from how its released model scores them.",
    )
    canaries: int = setting(100, "`audit`: how many canaries are drawn.")
    audit_client: int = setting(0, "`audit`: the client whose data the canaries go into.")
    audit_guesses: int = setting(
        0,
        "`audit`: in/out guesses the auditor makes (half each) on the highest and lowest "
        "scores, at most `canaries`; 0: one on every canary.",
    )

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
