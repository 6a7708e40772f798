"""The tables a run prints in the terminal: its clients, and its held-out results."""

from __future__ import annotations

import json
from typing import Any

from rich.table import Table

from silotune.data.partition import Partitions
from silotune.evaluation.intervals import BASE
from silotune.jobs import AlgorithmResult, AlgorithmSpec
from silotune.report.markdown import METRICS, difference_cells, difference_columns


def clients_table(split: Partitions) -> Table:
    """Each client's record count and label mix."""
    table = Table(title="clients")
    table.add_column("client", justify="right")
    table.add_column("records", justify="right")
    table.add_column("label mix")
    for row in split.stats():
        labels = row["labels"]
        assert isinstance(labels, dict)
        table.add_row(str(row["client"]), str(row["size"]), json.dumps(labels)[1:-1] or "–")
    return table


def results_table(
    runs: list[tuple[AlgorithmSpec, AlgorithmResult, dict[str, object]]],
    base: dict[str, float],
    intervals: dict[str, Any],
) -> Table:
    """The final held-out metrics of the base model and each algorithm, with each one's
    difference to the references and its interval, and the traffic."""
    table = Table(title="held-out results")
    # Only the metrics this run has (ROUGE-L for generation, accuracy for choices, ...).
    shown = [
        (k, label) for k, label in METRICS if k in base or any(k in r.final for _, r, _ in runs)
    ]
    diffs = difference_columns(intervals)  # per reference and metric: Δ with its interval
    found = intervals.get("runs", {})
    headers = [label for _, label in shown] + [header for _, _, header in diffs]
    for col in ("algorithm", "mode"):
        table.add_column(col)
    # Narrow terminals wrap a cell rather than cut an interval short.
    for col in (*headers, "bytes up", "bytes down"):
        table.add_column(col, justify="right", overflow="fold")
    table.add_row(
        "base", "–", *_cells(base, shown), *_stacked(found.get(BASE, {}), diffs), "0", "0"
    )
    for spec, result, summary in runs:
        comm = summary["communication"]
        assert isinstance(comm, dict)
        table.add_row(
            spec.name,
            spec.mode,
            *_cells(result.final, shown),
            *_stacked(found.get(spec.name, {}), diffs),
            f"{comm['bytes_up']:,}",
            f"{comm['bytes_down']:,}",
        )
    return table


def _cells(metrics: dict[str, float], shown: list[tuple[str, str]]) -> list[str]:
    return [f"{metrics[k]:.4f}" if k in metrics else "–" for k, _ in shown]


def _stacked(found: dict[str, Any], diffs: list[tuple[str, str, str]]) -> list[str]:
    """The difference cells with the interval on a line of its own, so the table stays narrow."""
    return [cell.replace(" [", "\n[", 1) for cell in difference_cells(found, diffs)]
