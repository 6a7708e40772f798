"""Per-round curves as PNG files (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

__all__ = ["CURVES", "plot_curves", "plot_epsilon", "plt", "save_figure"]

# Metric key -> axis label
CURVES = {"eval_loss": "held-out loss", "rouge_l": "ROUGE-L F", "accuracy": "accuracy"}


def plot_curves(
    series: dict[str, list[dict[str, float]]],
    base: dict[str, float],
    folder: Path,
    final_intervals: dict[str, dict[str, Any]] | None = None,
) -> list[Path]:
    """One PNG per metric: a line per series (algorithm) over rounds, the base model dashed;
    `final_intervals` (series -> metric -> {value, low, high}): error bars on the last round."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for key, label in CURVES.items():
        if not any(key in row for rows in series.values() for row in rows):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rows in series.items():
            points = [(row["round"], row[key]) for row in rows if key in row]
            if not points:  # e.g. generation metrics of a run that never generated
                continue
            line = ax.plot(*zip(*points, strict=True), marker="o", label=name)[0]
            own = (final_intervals or {}).get(name, {}).get(key)
            if own and own["low"] is not None:  # per-record scores exist for the final model only
                x, y = points[-1]
                yerr = [[y - own["low"]], [own["high"] - y]]
                ax.errorbar([x], [y], yerr=yerr, color=line.get_color(), capsize=3)
        if key in base:
            ax.axhline(base[key], linestyle="--", color="grey", label="base model")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.set_title(f"{label} per round")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(save_figure(fig, folder / f"{key}.png"))
    return written


def plot_epsilon(rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Each client's record-level ε after every round (none if no ε is finite)."""
    series: dict[int, list[tuple[int, float]]] = {}
    for row in rows:
        total = row.get("client_epsilon")
        if isinstance(total, int | float):
            series.setdefault(int(row["client"]), []).append((int(row["round"]), float(total)))
    if not series:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for client, points in sorted(series.items()):
        ax.plot(*zip(*sorted(set(points)), strict=True), marker="o", label=f"client {client}")
    ax.set_xlabel("round")
    ax.set_ylabel("record-level ε")
    ax.set_title("privacy spent per round")
    ax.grid(alpha=0.3)
    ax.legend()
    return [save_figure(fig, folder / "epsilon.png")]


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write (PNG, 110 dpi) and close a figure; returns its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
