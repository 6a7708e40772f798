"""A client's own privacy budget (`privacy.max_epsilon`): what it has spent, kept in its own
state, and the refusal to take part in a round that would pass the budget."""

from __future__ import annotations

import torch

from silotune.config import Config
from silotune.config_privacy import PrivacyConfig
from silotune.privacy.ledger import compose, record_delta
from silotune.privacy.mechanisms import GaussianUse
from silotune.training.dp import planned_use

# In a client's store: one (noise multiplier, sample rate, steps) row per DP use.
_KEY = "privacy-spent"


# The metric a client reports instead of an update when its budget is spent (a decline, not a
# failure: it released nothing this round).
DECLINED = "privacy-budget-spent"


class BudgetSpent(RuntimeError):
    """The next round would take a client's record-level ε past `privacy.max_epsilon`."""


def spent(store: dict[str, dict[str, torch.Tensor]]) -> list[GaussianUse]:
    """The DP uses a client has made so far, from its own store."""
    rows = store.get(_KEY, {}).get("uses")
    if rows is None:
        return []
    return [GaussianUse(float(s), float(q), int(n)) for s, q, n in rows.tolist()]


def record(store: dict[str, dict[str, torch.Tensor]], use: GaussianUse) -> None:
    """Add a use to the client's store (it never leaves the client)."""
    # float64: the accountant must see exactly the noise and rate that ran
    row = torch.tensor(
        [[use.noise_multiplier, use.sample_rate, float(use.steps)]], dtype=torch.float64
    )
    before = store.get(_KEY, {}).get("uses")
    store[_KEY] = {"uses": row if before is None else torch.cat([before, row])}


def check_round(config: Config, store: dict[str, dict[str, torch.Tensor]], records: int) -> None:
    """Before a DP-SGD client's round on `records` records: refuse it (BudgetSpent) if it would
    take the client's ε past privacy.max_epsilon."""
    privacy = config.privacy
    if privacy.mode == "dp-sgd":
        planned = planned_use(privacy, config.train, records)
        check(privacy, spent(store), planned, record_delta(privacy.delta, records))


def check(
    privacy: PrivacyConfig, history: list[GaussianUse], planned: GaussianUse, delta: float
) -> None:
    """Refuse (BudgetSpent) a round whose planned use would take ε past the budget."""
    if privacy.max_epsilon <= 0:
        return
    epsilon = compose([*history, planned], delta, privacy.accountant)
    if epsilon > privacy.max_epsilon:
        raise BudgetSpent(
            f"privacy budget spent: one more round would take this client's ε to {epsilon:.3g}, "
            f"past privacy.max_epsilon = {privacy.max_epsilon:g}; it takes no further part"
        )
