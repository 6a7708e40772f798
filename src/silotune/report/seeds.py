"""The report of repeated seeds: each algorithm's final metrics, and its differences to the
references, as the mean and spread over seeds beside each seed's own interval over records."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from silotune.evaluation.intervals import Interval, over_seeds, seeds_cell
from silotune.privacy.ledger import largest_epsilon
from silotune.report.markdown import table
from silotune.report.plots import CURVES, plt, save_figure
from silotune.report.sweep import SEEDS_FILE, SPREAD, load_results

_ABOUT = (
    "Each seed reruns the whole experiment (data split, initialisation, sampling). A cell "
    "gives the mean ± standard deviation over the seeds; a difference also gives a 95 % "
    "t-interval of its mean over the seeds, and in how many seeds its own paired bootstrap "
    "interval over the held-out records excludes 0 (each seed's interval is in the table "
    "below and in that seed's report)."
)


def write_seeds_report(folder: Path, seeds: list[tuple[str, str, Path]]) -> None:
    """`seeds`: (label, seed, finished experiment folder) in order; writes seeds.json,
    report.md and plots/seeds_<metric>.png into `folder`."""
    results = {label: load_results(path) for label, _, path in seeds}
    vs = {label: _intervals(path, results[label]) for label, _, path in seeds}
    own_vs = {label: _intervals(path, results[label], "per_client") for label, _, path in seeds}
    names = list(next(iter(results.values())))
    runs = {name: _aggregate(name, seeds, results, vs) for name in names}
    for name in names:
        if own := _own_distribution(name, seeds, results, own_vs):
            runs[name]["per_client"] = own
    base = _spread([results[label][names[0]].get("base", {}) for label, _, _ in seeds])
    data = {"seeds": [int(seed) for _, seed, _ in seeds], "base": base, "runs": runs}
    (folder / SEEDS_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    plots = _plot(folder, seeds, results, names)
    text = "\n".join(
        [
            f"# {len(seeds)} seeds: {', '.join(seed for _, seed, _ in seeds)}",
            "",
            _ABOUT,
            "",
            _summary_table(runs, base),
            "",
            *_own_table(runs),
            "## Each seed's differences (paired bootstrap 95 % intervals over records)",
            "",
            _per_seed_table(seeds, vs),
            "",
            *(f"![{p.stem}]({p.relative_to(folder).as_posix()})" for p in plots),
            "",
        ]
    )
    (folder / "report.md").write_text(text, encoding="utf-8")


def _intervals(folder: Path, results: dict[str, Any], key: str = "intervals") -> dict[str, Any]:
    """algorithm -> reference -> metric -> {diff, low, high, ...} of one seed's experiment, on
    the shared held-out set (`key` "intervals") or the clients' own records ("per_client")."""
    comparison = folder / "comparison.json"
    if comparison.is_file():
        found: dict[str, Any] = json.loads(comparison.read_text()).get(key, {})
        return dict(found.get("runs", {}))
    if key != "intervals":
        return {}
    return {name: s.get("intervals", {}).get("vs", {}) for name, s in results.items()}


def _per_seed(
    name: str, seeds: list[tuple[str, str, Path]], vs: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """reference -> metric -> the difference over seeds (see _difference)."""
    diffs: dict[str, dict[str, Any]] = {}
    for label, seed, _ in seeds:
        for ref, metrics in vs[label].get(name, {}).items():
            for metric, found in metrics.items():
                diffs.setdefault(ref, {}).setdefault(metric, {})[seed] = found
    return {
        ref: {metric: over_seeds(per_seed) for metric, per_seed in metrics.items()}
        for ref, metrics in diffs.items()
    }


def _own_distribution(
    name: str,
    seeds: list[tuple[str, str, Path]],
    results: dict[str, dict[str, Any]],
    own_vs: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Each client's model on its own held-out records, over the seeds (empty without them)."""
    found = [results[label][name].get("per_client_eval", {}) for label, _, _ in seeds]
    if not all("own" in f for f in found):
        return {}
    rows = [{"own": f["own"]["eval_loss"], "others": f["others_mean"]} for f in found]
    return {**_spread(rows), "vs": _per_seed(name, seeds, own_vs)}


def _aggregate(
    name: str,
    seeds: list[tuple[str, str, Path]],
    results: dict[str, dict[str, Any]],
    vs: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    summaries = [results[label][name] for label, _, _ in seeds]
    final = _spread([s["final"] for s in summaries])
    return {
        "final": final,
        "vs": _per_seed(name, seeds, vs),
        # What a sweep over these seeds shows: the mean, and the largest ε of any seed.
        "summary": {
            "final": {k: v["mean"] for k, v in final.items()},
            SPREAD: {k: v["sd"] for k, v in final.items()},
            "privacy": max(summaries, key=largest_epsilon).get("privacy", {}),
        },
    }


def _spread(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """metric -> mean, sd, min, max over the rows (seeds) that have it."""
    out = {}
    for metric in dict.fromkeys(k for row in rows for k in row):
        values = [float(row[metric]) for row in rows if isinstance(row.get(metric), int | float)]
        if values:
            out[metric] = {
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
                "seeds": len(values),
            }
    return out


def _summary_table(runs: dict[str, Any], base: dict[str, Any]) -> str:
    metrics = [m for m in CURVES if any(m in r["final"] for r in runs.values())]
    pairs = list(
        dict.fromkeys((ref, m) for r in runs.values() for ref in r["vs"] for m in r["vs"][ref])
    )
    rows = [["base (no tuning)", *(_mean_sd(base.get(m)) for m in metrics), *("–" for _ in pairs)]]
    for name, run in runs.items():
        cells = [seeds_cell(run["vs"].get(ref, {}).get(m)) for ref, m in pairs]
        rows.append([name, *(_mean_sd(run["final"].get(m)) for m in metrics), *cells])
    header = ["model", *(CURVES[m] for m in metrics)]
    header += [f"Δ {CURVES.get(m, m)} vs {ref}" for ref, m in pairs]
    return table(header, rows)


def _own_table(runs: dict[str, Any]) -> list[str]:
    """Each client's model on its own held-out records, over the seeds (client_eval_size)."""
    scored = {name: run["per_client"] for name, run in runs.items() if "per_client" in run}
    if not scored:
        return []
    refs = list(dict.fromkeys(ref for own in scored.values() for ref in own["vs"]))
    rows = [
        [
            name,
            _mean_sd(own.get("own")),
            _mean_sd(own.get("others")),
            *(seeds_cell(own["vs"].get(ref, {}).get("eval_loss")) for ref in refs),
        ]
        for name, own in scored.items()
    ]
    header = ["model", "own held-out loss", "on others' records"]
    header += [f"Δ own loss vs {ref}" for ref in refs]
    return [
        "## Each client's own distribution, over the seeds",
        "",
        "Each client's model on that client's own held-out records, pooled over the clients "
        "(see each seed's report for the matrix of every model on every client's records).",
        "",
        table(header, rows),
        "",
    ]


def _per_seed_table(seeds: list[tuple[str, str, Path]], vs: dict[str, dict[str, Any]]) -> str:
    pairs = list(
        dict.fromkeys(
            (ref, m)
            for found in vs.values()
            for refs in found.values()
            for ref, metrics in refs.items()
            for m in metrics
        )
    )
    rows = [
        [seed, name, *(_interval_cell(refs.get(ref, {}).get(m)) for ref, m in pairs)]
        for label, seed, _ in seeds
        for name, refs in vs[label].items()
    ]
    return table(["seed", "model", *(f"Δ {CURVES.get(m, m)} vs {ref}" for ref, m in pairs)], rows)


def _mean_sd(found: dict[str, float] | None) -> str:
    return f"{found['mean']:.4f} ± {found['sd']:.4f}" if found else "–"


def _interval_cell(found: dict[str, Any] | None) -> str:
    return Interval.from_json(found).cell() if found else "–"


def _plot(
    folder: Path,
    seeds: list[tuple[str, str, Path]],
    results: dict[str, dict[str, Any]],
    names: list[str],
) -> list[Path]:
    """Per metric: each algorithm's final value in every seed, with that seed's own bootstrap
    interval over records as its error bar, and the mean over seeds as a bar."""
    (folder / "plots").mkdir(exist_ok=True)
    written = []
    for metric, label in CURVES.items():
        if not any(metric in results[lab][n]["final"] for lab, _, _ in seeds for n in names):
            continue
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(names)), 4))
        for i, (lab, seed, _) in enumerate(seeds):
            offset = (i - (len(seeds) - 1) / 2) * 0.12
            for x, name in enumerate(names):
                summary = results[lab][name]
                if metric not in summary["final"]:
                    continue
                y = summary["final"][metric]
                own = summary.get("intervals", {}).get("own", {}).get(metric)
                yerr = (
                    [[y - own["low"]], [own["high"] - y]]
                    if own and own["low"] is not None
                    else None
                )
                ax.errorbar([x + offset], [y], yerr=yerr, fmt="o", capsize=3, color=f"C{i}")
            ax.plot([], [], "o", color=f"C{i}", label=f"seed {seed}")
        means = [
            statistics.fmean(vals) if (vals := _values(results, seeds, n, metric)) else math.nan
            for n in names
        ]
        ax.bar(range(len(names)), means, width=0.6, alpha=0.15, color="grey", label="mean")
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(label)
        ax.set_title(f"final {label}, each seed with its interval over records")
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
        shown = [v for n in names for v in _values(results, seeds, n, metric)]
        if shown:  # bars start at 0; zoom to where the points are
            span = max(shown) - min(shown) or abs(max(shown)) * 0.05 or 1.0
            ax.set_ylim(min(shown) - span, max(shown) + span)
        written.append(save_figure(fig, folder / "plots" / f"seeds_{metric}.png"))
    return written


def _values(
    results: dict[str, dict[str, Any]], seeds: list[tuple[str, str, Path]], name: str, metric: str
) -> list[float]:
    return [
        float(results[lab][name]["final"][metric])
        for lab, _, _ in seeds
        if metric in results[lab][name]["final"]
    ]
