"""The privacy ledger of a finished algorithm, built from what its rounds record.

An algorithm declares what leaves its clients (`AlgorithmSpec.releases`): per mechanism either
None (its clients train it with DP and report each use in their round metrics, see
`GaussianUse.metrics`) or the reason it has no guarantee. Every round's participants are read
from the round's client entries; the ledger is a function of the rounds alone, so a resumed run
(whose rounds come from its checkpoint) reports the same ε as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from silotune.config import Config
from silotune.data.dp_synthetic import generation_use
from silotune.defences.split import calibrated
from silotune.jobs import RoundLog
from silotune.privacy.budget import DECLINED
from silotune.privacy.ledger import Ledger, record_delta
from silotune.privacy.mechanisms import GaussianUse, Mechanism, Releases
from silotune.privacy.noise import REPLAYABLE
from silotune.training.dp import planned_use, sample_rate

# CenIT and split-central: the records themselves leave their clients.
POOLED = "the raw records are pooled in one place"


def dp_sgd_release(config: Config, what: str) -> str | None:
    """An adapter trained by the one training loop: accounted under DP-SGD, else not private."""
    if config.privacy.mode == "dp-sgd":
        return None
    return f"{what} trained without DP (privacy.mode = off)"


def central_releases(config: Config) -> Releases:
    """Flower's DP on the averaged update, when configured: user level, accounted per round."""
    if config.defence.dp == "none":
        return {}
    if config.defence.dp_noise_multiplier == 0:
        return {"central": "Flower's DP clips but adds no noise (defence.dp_noise_multiplier = 0)"}
    return {"central": None}


def planned_uses(config: Config, releases: Releases, records: int) -> dict[Mechanism, GaussianUse]:
    """What one round of a client runs, per accounted record-level mechanism of `releases`:
    FedPIT's private generation, and under DP-SGD the adapter's DP-SGD and the split wire's
    calibrated Gaussian mechanisms, on the same Poisson-sampled batches."""
    accounted = {m for m, reason in releases.items() if reason is None and m != "central"}
    uses: dict[Mechanism, GaussianUse] = {}
    if "synthetic" in accounted:
        delta = record_delta(config.privacy.delta, records)
        uses["synthetic"] = generation_use(
            config.synthetic, config.train.rounds, records, delta, config.privacy.accountant
        )
    if config.privacy.mode != "dp-sgd":
        return uses
    wire = {m: s for m, s in calibrated(config.defence).items() if m in accounted}
    train = config.train
    rate = sample_rate(train.batch_size, records)
    uses.update({m: GaussianUse(s, rate, train.local_steps) for m, s in wire.items()})
    if "adapter" in accounted:
        uses["adapter"] = planned_use(config.privacy, train, records, tuple(wire.values()))
    return uses


def run_ledger(
    config: Config,
    releases: Releases,
    rounds: list[RoundLog],
    records: Mapping[int, int],
) -> Ledger:
    """Every client's releases in every round of a finished algorithm."""
    ledger = Ledger.for_config(config.privacy, records)
    plans = {c: planned_uses(config, releases, n) for c, n in records.items()}
    everyone = sorted(records)
    for n, log in enumerate(rounds):
        # Only the run's clients: an id a reply made up has no records to account.
        reports = {int(c["client"]): c for c in log.clients if c.get("client") in records}
        declined = {c for c, report in reports.items() if DECLINED in report}
        # Centralized algorithms list no clients: every client's records took part.
        for client in sorted(set(reports) - declined) if reports else everyone:
            for mechanism, reason in releases.items():
                if mechanism == "records" and n > 0:
                    continue  # pooled once, before the first round
                use = _use(config, mechanism, reports.get(client, {}))
                if reason is None and mechanism != "central" and config.privacy.replayable_noise:
                    reason = REPLAYABLE  # anyone with the config can subtract the noise
                if reason is not None:
                    ledger.no_guarantee(client, log.round, mechanism, reason)
                elif use is None:
                    ledger.no_guarantee(client, log.round, mechanism, "no DP use reported")
                elif mechanism != "central" and use != (planned := plans[client].get(mechanism)):
                    # A client reports its own use: never believe one the config did not plan.
                    why = f"the client reported {use}, not the configured {planned}"
                    ledger.no_guarantee(client, log.round, mechanism, why)
                else:
                    ledger.account(client, log.round, mechanism, use)
    return ledger


def _use(config: Config, mechanism: Mechanism, report: Mapping[str, Any]) -> GaussianUse | None:
    if mechanism == "central":
        # Flower adds noise of dp_noise_multiplier x the clipping norm to the sum of the clipped
        # updates once a round, with no amplification by client sampling.
        return GaussianUse(config.defence.dp_noise_multiplier, 1.0, 1)
    return GaussianUse.reported(mechanism, report)
