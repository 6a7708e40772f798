"""The report of a sweep: each algorithm's final held-out metrics against the swept value."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from silotune.evaluation.intervals import BASE, Interval
from silotune.privacy.ledger import largest_epsilon
from silotune.report.markdown import shown_epsilon, table
from silotune.report.plots import CURVES, plt, save_figure
from silotune.report.privacy import LEAKAGE, leakage_headlines, load_privacy
from silotune.report.sweep_pairs import cell, versus_first

_COLUMNS = (
    ("eval_loss", "eval loss"),
    ("rouge_l", "ROUGE-L"),
    ("accuracy", "accuracy"),
    ("judge_win_rate", "judge"),
)


SEEDS_FILE = "seeds.json"  # what a folder of repeated seeds holds (see silotune.report.seeds)
SPREAD = "spread"  # a mean over seeds' summary: metric -> its standard deviation over the seeds


def load_results(folder: Path) -> dict[str, dict[str, Any]]:
    """algorithm -> summary of a finished experiment folder (one or several algorithms); of a
    folder of repeated seeds, the mean over its seeds."""
    if (seeds := folder / SEEDS_FILE).is_file():
        repeated = json.loads(seeds.read_text())["runs"]
        return {name: dict(run["summary"]) for name, run in repeated.items()}
    comparison = folder / "comparison.json"
    if comparison.is_file():
        runs: dict[str, dict[str, Any]] = json.loads(comparison.read_text())["runs"]
        return runs
    summary = json.loads((folder / "summary.json").read_text())
    return {summary["algorithm"]: summary}


def load_leakage(folder: Path) -> dict[str, dict[str, float]]:
    """algorithm -> headline leakage figures of the attacks run on an experiment folder (the
    mean over the seeds of a folder of repeated seeds)."""
    if (seeds := folder / SEEDS_FILE).is_file():
        labels = [f"seed={s}" for s in json.loads(seeds.read_text())["seeds"]]
        found = [load_leakage(folder / label) for label in labels]
        return {
            name: {
                k: sum(f[name][k] for f in found) / len(found)
                for k in found[0][name]
                if all(k in f.get(name, {}) for f in found)
            }
            for name in found[0]
        }
    if (folder / "summary.json").is_file():
        summary = json.loads((folder / "summary.json").read_text())
        by_algorithm = {summary["algorithm"]: load_privacy(folder)}
    else:
        by_algorithm = load_privacy(folder)
    return {name: leakage_headlines(found) for name, found in by_algorithm.items()}


def write_sweep_report(folder: Path, key: str, variants: list[tuple[str, str, Path]]) -> None:
    """`variants`: (label, value, experiment folder) in sweep order."""
    results = {label: load_results(path) for label, _, path in variants}
    leakage = {label: load_leakage(path) for label, _, path in variants}
    algorithms = list(next(iter(results.values())))
    leaks = [
        (k, lab)
        for k, lab in LEAKAGE
        if any(k in leakage[label].get(name, {}) for label in leakage for name in algorithms)
    ]
    finals = [results[label][name]["final"] for label in results for name in algorithms]
    columns = [(k, lab) for k, lab in _COLUMNS if any(k in f for f in finals)]  # what runs have
    summaries = [results[label][name] for label in results for name in algorithms]
    diffs = [(k, lab) for k, lab in _COLUMNS if any(k in _vs_base(s) for s in summaries)]
    # Each value after the first against the first, paired on the same records.
    paired = [{}, *versus_first([path for _, _, path in variants])]
    versus = [(k, lab) for k, lab in _COLUMNS if any(k in f for p in paired for f in p.values())]
    rows = []
    for (label, value, _), against in zip(variants, paired, strict=True):
        for name in algorithms:
            final = results[label][name]["final"]
            leaked = leakage[label].get(name, {})
            rows.append(
                [value, f"[{name}]({label}/{name}/report.md)" if len(algorithms) > 1 else name]
                + [final.get(k, "–") for k, _ in columns]
                + _diff_cells(_vs_base(results[label][name]), diffs)
                + [cell(against.get(name, {}).get(k)) for k, _ in versus]
                + [shown_epsilon(largest_epsilon(results[label][name]))]
                + [leaked.get(k, "–") for k, _ in leaks]
            )
    plots = _plot(folder, key, variants, results, algorithms)
    plots += _plot_epsilon(folder, variants, results, algorithms)
    plots += _plot_tradeoff(folder, key, variants, results, leakage, algorithms, leaks)
    text = "\n".join(
        [
            f"# Sweep over {key}",
            "",
            "Each value runs the whole experiment (same seeds, budget and held-out set); the "
            "table shows every algorithm's final held-out metrics"
            + (
                f" and its difference to the base model. {_about(summaries)} Error bars: each "
                "metric's own bootstrap 95 % interval over the same records."
                if diffs
                else "."
            )
            + (
                " With experiment.seeds, each value shows the mean over its seeds (its own "
                "report gives the spread and each seed's intervals); error bars: ± one standard "
                "deviation over the seeds."
                if any(SPREAD in s for s in summaries)
                else ""
            )
            + (
                f" Δ … vs {key} = {variants[0][1]}: each value against the first on the same "
                "held-out records, paired over them"
                + (
                    "; with seeds, the mean ± sd over the seeds of each seed's paired "
                    "difference, its 95 % t-interval, and in how many seeds that difference's "
                    "own interval excludes 0."
                    if any(SPREAD in s for s in summaries)
                    else "."
                )
                if versus
                else ""
            ),
            "",
            table(
                [
                    key,
                    "algorithm",
                    *(label for _, label in columns),
                    *(f"Δ {label} vs base" for _, label in diffs),
                    *(f"Δ {label} vs {key} = {variants[0][1]}" for _, label in versus),
                    "record-level ε (max over clients)",
                    *(lab for _, lab in leaks),
                ],
                rows,
            ),
            "",
            *(f"![{p.stem}]({p.relative_to(folder).as_posix()})" for p in plots),
            "",
        ]
    )
    (folder / "report.md").write_text(text, encoding="utf-8")
    (folder / "sweep.json").write_text(
        json.dumps(
            {
                "key": key,
                "values": {v: results[label] for label, v, _ in variants},
                "versus_first": {v: p for (_, v, _), p in zip(variants, paired, strict=True)},
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )


def _vs_base(summary: dict[str, Any]) -> dict[str, Any]:
    """metric -> {diff, low, high, ...} to the base model, from a summary.json (may be empty)."""
    found: dict[str, Any] = summary.get("intervals", {}).get("vs", {}).get(BASE, {})
    return found


def _diff_cells(vs_base: dict[str, Any], diffs: list[tuple[str, str]]) -> list[str]:
    return [Interval.from_json(vs_base[k]).cell() if k in vs_base else "–" for k, _ in diffs]


def _own(summary: dict[str, Any], metric: str) -> tuple[float | None, float | None]:
    """The bootstrap interval (low, high) of a run's own final metric, or the mean ± one sd of a
    mean over seeds; (None, None) if neither."""
    if metric in summary.get(SPREAD, {}):
        mean, sd = summary["final"][metric], summary[SPREAD][metric]
        return mean - sd, mean + sd
    own = summary.get("intervals", {}).get("own", {}).get(metric)
    return (own["low"], own["high"]) if own else (None, None)


def _about(summaries: list[dict[str, Any]]) -> str:
    return str(next(s["intervals"]["about"] for s in summaries if "intervals" in s))


def _plot_epsilon(
    folder: Path,
    variants: list[tuple[str, str, Path]],
    results: dict[str, dict[str, dict[str, Any]]],
    algorithms: list[str],
) -> list[Path]:
    """Utility against the accounted record-level ε, a point per swept value (finite ε only)."""
    (folder / "plots").mkdir(exist_ok=True)
    written = []
    for metric, label in CURVES.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        plotted = False
        for name in algorithms:
            points = sorted(
                (eps, run["final"][metric])
                for lab, _, _ in variants
                if math.isfinite(eps := largest_epsilon(run := results[lab][name]))
                and metric in run["final"]
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=name)
                plotted = True
        if not plotted:
            plt.close(fig)
            continue
        xlabel = "record-level ε (max over clients, from the privacy ledger)"
        titles = (xlabel, label, f"final {label} against ε")
        written.append(_finish(fig, ax, titles, folder / "plots" / f"epsilon_{metric}.png"))
    return written


def _plot(
    folder: Path,
    key: str,
    variants: list[tuple[str, str, Path]],
    results: dict[str, dict[str, dict[str, Any]]],
    algorithms: list[str],
) -> list[Path]:
    try:
        xs = [float(v) for _, v, _ in variants]
    except ValueError:
        return []  # a sweep over names has no axis to plot on
    (folder / "plots").mkdir(exist_ok=True)
    written = []
    for metric, label in CURVES.items():
        if not any(metric in results[lab][n]["final"] for lab in results for n in algorithms):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in algorithms:
            runs = [results[lab][name] for lab, _, _ in variants]
            ys = [run["final"].get(metric, math.nan) for run in runs]
            # A run folder written before per-record scores existed has no bar.
            bars = [_own(run, metric) for run in runs]
            yerr = [
                [y - low if low is not None else 0.0 for y, (low, _) in zip(ys, bars, strict=True)],
                [hi - y if hi is not None else 0.0 for y, (_, hi) in zip(ys, bars, strict=True)],
            ]
            ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, label=name)
        if min(xs) > 0 and max(xs) / min(xs) >= 100:
            ax.set_xscale("log")
        titles = (key, label, f"final {label} against {key}")
        written.append(_finish(fig, ax, titles, folder / "plots" / f"sweep_{metric}.png"))
    return written


def _plot_tradeoff(
    folder: Path,
    key: str,
    variants: list[tuple[str, str, Path]],
    results: dict[str, dict[str, dict[str, Any]]],
    leakage: dict[str, dict[str, dict[str, float]]],
    algorithms: list[str],
    leaks: list[tuple[str, str]],
) -> list[Path]:
    """Utility (held-out loss) against each leakage figure, a point per swept value."""
    (folder / "plots").mkdir(exist_ok=True)
    written = []
    for metric, label in leaks:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in algorithms:
            points = [
                (results[lab][name]["final"]["eval_loss"], leakage[lab][name][metric], value)
                for lab, value, _ in variants
                if metric in leakage[lab].get(name, {})
            ]
            if not points:
                continue
            xs, ys, _ = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=name)
            for x, y, value in points:
                ax.annotate(f"{value}", (x, y), textcoords="offset points", xytext=(4, 4))
        xlabel = "held-out loss (utility: lower is better)"
        titles = (xlabel, label, f"utility against leakage, {key} swept")
        written.append(_finish(fig, ax, titles, folder / "plots" / f"tradeoff_{metric}.png"))
    return written


def _finish(fig: Any, ax: Any, titles: tuple[str, str, str], path: Path) -> Path:
    """Label (x, y, title), grid and legend a sweep plot, then save it."""
    xlabel, ylabel, title = titles
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
