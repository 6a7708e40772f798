"""The tables a run prints in the terminal: its clients, its held-out results, and each
result's differences to the references, one row per (algorithm, reference) so that intervals
stay on one line in an 80-column terminal."""

from __future__ import annotations

import json
import statistics
from typing import Any

from rich.table import Table

from silotune.data.partition import Partitions
from silotune.evaluation.intervals import BASE
from silotune.jobs import AlgorithmResult, AlgorithmSpec
from silotune.report.markdown import METRICS, difference_cells

WIDE = 10  # more clients than this: a summary, the full table in partitions/stats.json


def clients_table(split: Partitions) -> Table:
    """Each client's record count and label mix (a summary beyond WIDE clients)."""
    stats = split.stats()
    if len(stats) > WIDE:
        return _clients_summary(stats)
    table = Table(title="clients")
    table.add_column("client", justify="right")
    table.add_column("records", justify="right")
    table.add_column("label mix")
    for row in stats:
        labels = row["labels"]
        assert isinstance(labels, dict)
        table.add_row(str(row["client"]), str(row["size"]), json.dumps(labels)[1:-1] or "–")
    return table


def _clients_summary(stats: list[dict[str, object]]) -> Table:
    """Records per client and how skewed their label mixes are, over all clients."""
    sizes = [int(str(row["size"])) for row in stats]
    # A client's skew: the share of its records that carry its most common label.
    shares = [
        max(labels.values()) / sum(labels.values())
        for row in stats
        if isinstance(labels := row["labels"], dict) and labels
    ]
    table = Table(title=f"{len(stats)} clients", caption="each one: partitions/stats.json")
    for col in ("", "min", "median", "max"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row("records", *(f"{v:g}" for v in _spread(sizes)))
    if shares:
        table.add_row("top label's share", *(f"{v:.0%}" for v in _spread(shares)))
    return table


def _spread(values: list[int] | list[float]) -> tuple[float, float, float]:
    return float(min(values)), float(statistics.median(values)), float(max(values))


def results_table(
    runs: list[tuple[AlgorithmSpec, AlgorithmResult, dict[str, object]]], base: dict[str, float]
) -> Table:
    """The final held-out metrics of the base model and each algorithm, and the traffic."""
    table = Table(title="held-out results")
    # Only the metrics this run has (ROUGE-L for generation, accuracy for choices, ...).
    shown = [
        (k, label) for k, label in METRICS if k in base or any(k in r.final for _, r, _ in runs)
    ]
    for col in ("algorithm", "mode"):
        table.add_column(col)
    for col in (*(label for _, label in shown), "bytes up", "bytes down"):
        table.add_column(col, justify="right", overflow="fold")
    table.add_row("base", "–", *_cells(base, shown), "0", "0")
    for spec, result, summary in runs:
        comm = summary["communication"]
        assert isinstance(comm, dict)
        table.add_row(
            spec.name,
            spec.mode,
            *_cells(result.final, shown),
            f"{comm['bytes_up']:,}",
            f"{comm['bytes_down']:,}",
        )
    return table


def differences_table(intervals: dict[str, Any], title: str) -> Table | None:
    """Each model's difference to each reference, metric by metric, with its interval
    (None when the comparison has no intervals)."""
    runs = intervals.get("runs", {})
    references = intervals.get("references", [])
    metrics = [
        (key, label)
        for key, label in METRICS
        if any(key in found.get(ref, {}) for found in runs.values() for ref in references)
    ]
    if not metrics:
        return None
    table = Table(title=title)
    for col in ("model", "vs"):
        table.add_column(col)
    for _, label in metrics:
        table.add_column(f"Δ {label} [95 %]", justify="right", overflow="fold")
    for name, found in runs.items():
        if name == BASE:  # base vs a reference is that reference vs base, negated
            continue
        for ref in references:
            if ref == name or ref not in found:
                continue
            table.add_row(name, ref, *difference_cells(found, [(ref, k, "") for k, _ in metrics]))
    return table


def per_client_table(summaries: dict[str, dict[str, Any]], base_own: float) -> Table:
    """Each client's model on its own held-out records and on the other clients' records."""
    view = Table(title="each client's model on its own held-out records (pooled loss)")
    for col in ("model", "own records", "others' records"):
        view.add_column(col, justify="left" if col == "model" else "right")
    view.add_row(BASE, f"{base_own:.4f}", "–")
    for name, s in summaries.items():
        found = s.get("per_client_eval", {})
        if "own" not in found:
            continue
        others = found["others_mean"]
        view.add_row(
            name,
            f"{found['own']['eval_loss']:.4f}",
            f"{others:.4f}" if others is not None else "–",
        )
    return view


def _cells(metrics: dict[str, float], shown: list[tuple[str, str]]) -> list[str]:
    return [f"{metrics[k]:.4f}" if k in metrics else "–" for k, _ in shown]
