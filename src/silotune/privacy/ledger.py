"""The per-client privacy ledger: what each client released, per round and mechanism, and its ε.

Record-level mechanisms of one client act on the same records, so its total ε composes them all
(Opacus's RDP or PRV accountant over their joint history of (noise_multiplier, sample_rate,
steps)); those its one training loop released in a round from the same batches count as the
one mechanism they are (`mechanisms.joint`), and where a split client sent its sampled records'
rows that round, which shows the sample, without amplification by sampling (rate 1).
"central" is Flower's user-level DP on the averaged update: listed with level "user", never
composed with the record-level ones. A release without a guarantee has ε = ∞ and makes its
mechanism's and its client's total ∞ too. JSON has no Infinity, so ∞ is written as the string
"inf" (see `json_epsilon`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from silotune.config_privacy import Accountant, PrivacyConfig
from silotune.privacy.mechanisms import (
    MECHANISMS,
    ONE_LOOP,
    WIRE,
    GaussianUse,
    Mechanism,
    joint,
)

USER_LEVEL: frozenset[Mechanism] = frozenset({"central"})
INFINITY = "inf"  # how ∞ is written in metrics.jsonl, summary.json and checkpoints
_VERSION = 1


@dataclass(frozen=True)
class Release:
    """One entry of the ledger: a client's use of a mechanism in a round; `use` None = no
    guarantee (ε = ∞), with the reason."""

    client: int
    round: int
    mechanism: Mechanism
    use: GaussianUse | None
    reason: str = ""


def json_epsilon(epsilon: float) -> float | str:
    """ε as strict JSON allows it: ∞ becomes the string "inf"."""
    return epsilon if math.isfinite(epsilon) else INFINITY


def epsilon_from_json(value: float | str) -> float:
    """The inverse of `json_epsilon`."""
    return math.inf if value == INFINITY else float(value)


def largest_epsilon(summary: Mapping[str, Any]) -> float:
    """The largest record-level ε of any client in a run's summary.json (∞: no guarantee, or a
    run written before the ledger existed)."""
    clients = summary.get("privacy", {}).get("clients", {})
    return max((epsilon_from_json(c["epsilon"]) for c in clients.values()), default=math.inf)


def record_delta(delta: float, records: int) -> float:
    """A client's δ: `delta` (privacy.delta), or 1 / (10 x its records) when that is 0."""
    return delta if delta > 0 else 1.0 / (10 * records)


def compose(uses: Iterable[GaussianUse], delta: float, accountant: Accountant) -> float:
    """ε at δ of all `uses` composed, by Opacus's `accountant` ("rdp" or "prv")."""
    # Composition is commutative: identical (sigma, q) merge into one entry, which keeps
    # PRV's convolutions few.
    steps: Counter[tuple[float, float]] = Counter()
    for use in uses:
        steps[(use.noise_multiplier, use.sample_rate)] += use.steps
    history = tuple(sorted((sigma, q, n) for (sigma, q), n in steps.items() if n > 0))
    return _epsilon(history, delta, accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, acc: Accountant) -> float:
    # history is Opacus's own: (noise_multiplier, sample_rate, steps) per entry. Cached: the
    # rows, the summary and the budget ask for the same histories again and again.
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    engine = create_accountant(mechanism=acc)
    engine.history = list(history)
    return float(engine.get_epsilon(delta=delta))


@functools.cache  # every client's round and every budget check asks the same question
def noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: Accountant
) -> float:
    """The noise multiplier whose `steps` uses at `sample_rate` reach at most `target_epsilon`."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be positive and finite, got {target_epsilon}")
    with warnings.catch_warnings():
        # The search probes huge noise, where RDP's best order is its largest: not a finding.
        warnings.filterwarnings("ignore", "Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )


class Ledger:
    """Per client, per round, per mechanism: what was released and its ε at the client's δ."""

    def __init__(
        self, records: Mapping[int, int], delta: float = 0.0, accountant: Accountant = "rdp"
    ) -> None:
        if accountant not in ("rdp", "prv"):
            raise ValueError(f"privacy accountant must be 'rdp' or 'prv', got {accountant!r}")
        # records: each client's number of records, for its default δ = 1 / (10 x records)
        self.records = dict(records)
        self.delta = delta
        self.accountant: Accountant = accountant
        self.releases: list[Release] = []

    @classmethod
    def for_config(cls, privacy: PrivacyConfig, records: Mapping[int, int]) -> Ledger:
        """An empty ledger with the δ and the accountant of the `[privacy]` section."""
        return cls(records, privacy.delta, privacy.accountant)

    # -- recording ---------------------------------------------------------------------------

    def account(self, client: int, round: int, mechanism: Mechanism, use: GaussianUse) -> None:
        """Record `use.steps` uses of a subsampled Gaussian mechanism."""
        self._check(client, mechanism)
        self.delta_of(client, mechanism)  # fails early on a client with no record count
        if not (0 < use.sample_rate <= 1 and use.noise_multiplier >= 0 and use.steps >= 0):
            raise ValueError(f"{mechanism} of client {client}: an impossible use {use}")
        self.releases.append(Release(client, round, mechanism, use))

    def no_guarantee(self, client: int, round: int, mechanism: Mechanism, reason: str) -> None:
        """Record a release with no DP guarantee (ε = ∞), and why."""
        self._check(client, mechanism)
        self.releases.append(Release(client, round, mechanism, None, reason))

    def _check(self, client: int, mechanism: Mechanism) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown privacy mechanism {mechanism!r}; one of {MECHANISMS}")

    # -- ε -------------------------------------------------------------------------------------

    def delta_of(self, client: int, mechanism: Mechanism = "adapter") -> float:
        """The δ of a client's ε: `delta`, or 1 / (10 x its records) (user level: x clients)."""
        if self.delta > 0:
            return self.delta
        if mechanism in USER_LEVEL:
            # A user-level neighbour differs by a whole client: count clients, not records.
            return 1.0 / (10 * max(len(self.records), 1))
        records = self.records.get(client, 0)
        if records <= 0:
            raise ValueError(f"client {client} has no record count: its δ is undefined")
        return record_delta(self.delta, records)

    def epsilon(
        self, client: int, mechanism: Mechanism | None = None, upto: int | None = None
    ) -> float:
        """ε of one mechanism of a client, or (mechanism None) of all its record-level ones
        composed; over rounds <= `upto` (None: all)."""
        chosen = self._chosen(client, mechanism, upto)
        if any(r.use is None for r in chosen):
            return math.inf
        pairs = [(r.round, r.mechanism, r.use) for r in chosen if r.use is not None]
        delta = self.delta_of(client, mechanism or "adapter")
        return compose(_joined(pairs, self._wire_rounds(client)), delta, self.accountant)

    def _wire_rounds(self, client: int) -> set[int]:
        """Rounds in which the client sent rows of sampled records (see mechanisms.WIRE)."""
        return {r.round for r in self.releases if r.client == client and r.mechanism in WIRE}

    def would_exceed(
        self, client: int, planned: list[tuple[Mechanism, GaussianUse]], max_epsilon: float
    ) -> bool:
        """Whether the client's record-level ε would pass `max_epsilon` after `planned` uses."""
        if any(m in USER_LEVEL for m, _ in planned):
            raise ValueError("the user-level budget is Flower's accountant's, not the ledger's")
        chosen = self._chosen(client, None, None)
        if any(r.use is None for r in chosen):
            return True
        pairs = [(r.round, r.mechanism, r.use) for r in chosen if r.use is not None]
        upcoming = max((r.round for r in self.releases), default=0) + 1
        pairs += [(upcoming, m, use) for m, use in planned]
        wire = self._wire_rounds(client) | (
            {upcoming} if any(m in WIRE for m, _ in planned) else set()
        )
        return compose(_joined(pairs, wire), self.delta_of(client), self.accountant) > max_epsilon

    def _chosen(self, client: int, mechanism: Mechanism | None, upto: int | None) -> list[Release]:
        return [
            r
            for r in self.releases
            if r.client == client
            and (upto is None or r.round <= upto)
            and (r.mechanism == mechanism if mechanism else r.mechanism not in USER_LEVEL)
        ]

    def _known_delta(self, client: int, mechanism: Mechanism) -> float | None:
        """The δ, or None for a client whose record count is unknown (only ε = ∞ releases)."""
        try:
            return self.delta_of(client, mechanism)
        except ValueError:
            return None

    # -- outputs -------------------------------------------------------------------------------

    def rows(self, round: int | None = None) -> list[dict[str, Any]]:
        """metrics.jsonl rows, one per (client, round, mechanism) (of `round` only, if given),
        with the running ε of the mechanism and of the client after that round."""
        keys = sorted({(r.client, r.round) for r in self.releases if round in (None, r.round)})
        rows: list[dict[str, Any]] = []
        for client, r in keys:
            total = json_epsilon(self.epsilon(client, None, r))
            for mechanism in MECHANISMS:
                those = [
                    x
                    for x in self.releases
                    if (x.client, x.round, x.mechanism) == (client, r, mechanism)
                ]
                if those:
                    rows.append(self._row(those, total))
        return rows

    def _row(self, those: list[Release], total: float | str) -> dict[str, Any]:
        first = those[0]
        uses = [x.use for x in those if x.use is not None]
        level = "user" if first.mechanism in USER_LEVEL else "record"
        return {
            "client": first.client,
            "round": first.round,
            "mechanism": first.mechanism,
            "level": level,
            # null where the round had no Gaussian use; a list where it had several settings
            "noise_multiplier": _one_or_all([u.noise_multiplier for u in uses]),
            "sample_rate": _one_or_all([u.sample_rate for u in uses]),
            "steps": sum(u.steps for u in uses),
            "guarantee": len(uses) == len(those),
            "reason": "; ".join(sorted({x.reason for x in those if x.use is None})),
            "epsilon": json_epsilon(self.epsilon(first.client, first.mechanism, first.round)),
            "client_epsilon": total if level == "record" else None,
            "delta": self._known_delta(first.client, first.mechanism),
        }

    def summary(self) -> dict[str, Any]:
        """summary.json's "privacy": per client its record-level total and each mechanism's ε."""
        clients: dict[str, Any] = {}
        for client in sorted({r.client for r in self.releases}):
            mechanisms: dict[str, Any] = {}
            for mechanism in MECHANISMS:
                those = [r for r in self.releases if (r.client, r.mechanism) == (client, mechanism)]
                if not those:
                    continue
                reasons = sorted({r.reason for r in those if r.use is None})
                mechanisms[mechanism] = {
                    "epsilon": json_epsilon(self.epsilon(client, mechanism)),
                    "delta": self._known_delta(client, mechanism),
                    "level": "user" if mechanism in USER_LEVEL else "record",
                    "guarantee": not reasons,
                    "reason": "; ".join(reasons),
                    "rounds": len({r.round for r in those}),
                }
            clients[str(client)] = {
                "epsilon": json_epsilon(self.epsilon(client)),
                "delta": self._known_delta(client, "adapter"),
                "level": "record",
                "records": self.records.get(client),
                "mechanisms": mechanisms,
            }
        return {"accountant": self.accountant, "infinity": INFINITY, "clients": clients}

    # -- checkpoint ----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The ledger's whole state, strict-JSON safe, for a checkpoint."""
        return {
            "version": _VERSION,
            "accountant": self.accountant,
            "delta": self.delta,
            "records": {str(c): n for c, n in self.records.items()},
            "releases": [
                {
                    "client": r.client,
                    "round": r.round,
                    "mechanism": r.mechanism,
                    "use": None
                    if r.use is None
                    else [r.use.noise_multiplier, r.use.sample_rate, r.use.steps],
                    "reason": r.reason,
                }
                for r in self.releases
            ],
        }

    @classmethod
    def from_json(cls, state: Mapping[str, Any]) -> Ledger:
        """The ledger `to_json` saved."""
        if state.get("version") != _VERSION:
            raise ValueError(f"privacy ledger state version {state.get('version')!r} unknown")
        ledger = cls(
            {int(c): int(n) for c, n in state["records"].items()},
            float(state["delta"]),
            state["accountant"],
        )
        for r in state["releases"]:
            use = r["use"]
            ledger.releases.append(
                Release(
                    int(r["client"]),
                    int(r["round"]),
                    r["mechanism"],
                    None if use is None else GaussianUse(float(use[0]), float(use[1]), int(use[2])),
                    str(r["reason"]),
                )
            )
        return ledger


def _joined(
    pairs: list[tuple[int, Mechanism, GaussianUse]], wire_rounds: set[int]
) -> list[GaussianUse]:
    """The uses to compose: per round, those of the one training loop joined into one, and in
    `wire_rounds` (rows of sampled records were sent) without amplification by sampling."""
    loops: dict[int, list[GaussianUse]] = {}
    rest: list[GaussianUse] = []
    for round, mechanism, use in pairs:
        if mechanism in ONE_LOOP:
            if round in wire_rounds:
                use = dataclasses.replace(use, sample_rate=1.0)
            loops.setdefault(round, []).append(use)
        else:
            rest.append(use)
    return rest + [joint(uses) for uses in loops.values()]


def _one_or_all(values: list[float]) -> float | list[float] | None:
    distinct = sorted(set(values))
    if not distinct:
        return None
    return distinct[0] if len(distinct) == 1 else distinct
