"""Where a privacy mechanism's randomness comes from (its noise, its Poisson samples).

DP's guarantee assumes the adversary cannot predict them. Seeded from the experiment seed, they
could be replayed and subtracted by anyone holding the config, and the server always holds it.
So by default every mechanism's generator is seeded with 63 bits from the operating system's
CSPRNG (`secrets`), drawn where it runs. `privacy.replayable_noise = true` derives the seeds from
the experiment seed instead, so that a run replays bit for bit (tests, research); the ledger then
lists every release those mechanisms noised with ε = ∞.
"""

from __future__ import annotations

import secrets

from silotune.config_privacy import PrivacyConfig
from silotune.seeds import derive_seed

REPLAYABLE = "its noise is replayable from experiment.seed (privacy.replayable_noise = true)"


def mechanism_seed(privacy: PrivacyConfig, seed: int, *parts: int | str) -> int:
    """A seed for a mechanism's generator: secret, or with replayable noise `seed` and `parts`'."""
    if privacy.replayable_noise:
        return derive_seed(seed, *parts)
    return secrets.randbits(63)
