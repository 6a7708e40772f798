"""report.md for one run and for a comparison of algorithms, with numbers from the run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from silotune.evaluation.intervals import Interval
from silotune.jobs import AlgorithmResult, AlgorithmSpec
from silotune.privacy.ledger import epsilon_from_json, largest_epsilon
from silotune.report.context import RunContext

# Held-out metrics in the order tables show them: (key, label).
METRICS = (
    ("eval_loss", "eval loss"),
    ("perplexity", "perplexity"),
    ("rouge_l", "ROUGE-L"),
    ("accuracy", "accuracy"),
    ("judge_win_rate", "judge win rate"),
)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _metric_cells(metrics: dict[str, float]) -> list[Any]:
    return [metrics.get(key, "–") for key, _ in METRICS]


def difference_columns(intervals: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(reference, metric, header) of every difference some run has, metric by metric."""
    runs = intervals.get("runs", {})
    return [
        (ref, key, f"Δ {label} vs {ref}")
        for key, label in METRICS
        for ref in intervals.get("references", [])
        if any(key in r.get(ref, {}) for r in runs.values())
    ]


def difference_cells(diffs: dict[str, Any], columns: list[tuple[str, str, str]]) -> list[str]:
    """`-0.0830 [-0.1010, -0.0640]*` per column of one model's differences (a dash: none)."""
    return [
        Interval.from_json(diffs[ref][key]).cell() if key in diffs.get(ref, {}) else "–"
        for ref, key, _ in columns
    ]


def differences_markdown(intervals: dict[str, Any], names: list[str]) -> list[str]:
    """The "Differences to the references" section (nothing without intervals)."""
    if not intervals.get("runs"):
        return []
    columns = difference_columns(intervals)
    rows = [[name, *difference_cells(intervals["runs"].get(name, {}), columns)] for name in names]
    return [
        "## Differences to the references",
        "",
        str(intervals["about"]),
        "",
        table(["algorithm", *(header for _, _, header in columns)], rows),
        "",
    ]


def synthetic_line(synthetic: dict[str, Any]) -> str:
    """`kept K of G generated (dropped: reason n, ...)`."""
    dropped = ", ".join(f"{k} {v}" for k, v in synthetic["dropped_by_filter"].items() if v)
    return (
        f"self-generated examples: kept {synthetic['kept']} of {synthetic['generated']}"
        + (f" (dropped: {dropped})" if dropped else "")
        + "."
    )


_LEVELS = {
    "record": "record-level: protects each record inside its client",
    "user": "user-level: protects a whole client's data (Flower's central DP)",
}


def ledger_markdown(privacy: dict[str, Any]) -> list[str]:
    """The "Privacy ledger" section from summary.json's "privacy"."""
    rows = []
    for client, entry in privacy["clients"].items():
        for mechanism, m in entry["mechanisms"].items():
            rows.append(
                [
                    client,
                    mechanism,
                    m["level"],
                    shown_epsilon(m["epsilon"]),
                    "–" if m["delta"] is None else f"{m['delta']:.2g}",
                    m["rounds"],
                    "yes" if m["guarantee"] else f"no: {m['reason']}",
                ]
            )
    totals = ", ".join(
        f"client {c}: {shown_epsilon(e['epsilon'])}" for c, e in privacy["clients"].items()
    )
    return [
        "## Privacy ledger",
        "",
        f"What left each client derived from its records, and its (ε, δ) by the "
        f"{privacy['accountant'].upper()} accountant. ε = ∞ means no guarantee.",
        "",
        table(["client", "mechanism", "level", "ε", "δ", "rounds", "DP guarantee"], rows),
        "",
        f"Record-level ε per client, every record-level mechanism composed: {totals}.",
        *(f"- {_LEVELS[level]}" for level in sorted(_levels(privacy))),
        "",
        *([audit_line(privacy), ""] if "audit" in privacy else []),
    ]


def audit_line(privacy: dict[str, Any]) -> str:
    """The canary audit's result beside the ledger's ε for the same client."""
    audit = privacy["audit"]
    client = audit["client"]
    if "not_audited" in audit:
        return f"Canary audit (client {client}): {audit['not_audited']}."
    ledger = privacy["clients"].get(str(client), {}).get("epsilon")
    return (
        f"Canary audit (client {client}): empirical ε ≥ {audit['epsilon_lower_bound']:.3g} at "
        f"{100 * audit['confidence']:.0f} % confidence ({audit['correct']} of {audit['guesses']} "
        f"guesses right), against the ledger's ε = "
        f"{'–' if ledger is None else shown_epsilon(ledger)}."
    )


def shown_epsilon(value: float | str) -> str:
    """ε as the reports print it (∞ for no guarantee)."""
    epsilon = epsilon_from_json(value)
    return "∞" if math.isinf(epsilon) else f"{epsilon:.3g}"


def _levels(privacy: dict[str, Any]) -> set[str]:
    return {m["level"] for e in privacy["clients"].values() for m in e["mechanisms"].values()}


def partition_table(stats: list[dict[str, Any]]) -> str:
    """Client sizes and label mixes."""
    rows = [
        [s["client"], s["size"], ", ".join(f"{k}: {v}" for k, v in s["labels"].items()) or "–"]
        for s in stats
    ]
    return table(["client", "records", "label mix"], rows)


def _plots(plots: list[Path], folder: Path) -> list[str]:
    return [f"![{p.stem}]({p.relative_to(folder).as_posix()})" for p in plots]


def _samples(samples: list[dict[str, str]]) -> list[str]:
    lines = []
    for s in samples:
        lines += [
            f"**Instruction:** {_fmt(s['instruction'])}",
            "",
            f"- reference: {_fmt(s['reference'])[:400]}",
            f"- generated: {_fmt(s['prediction'])[:400]}",
            "",
        ]
    return lines


def run_markdown(
    spec: AlgorithmSpec,
    result: AlgorithmResult,
    summary: dict[str, Any],
    partition_stats: list[dict[str, Any]],
    plots: list[Path],
    folder: Path,
) -> str:
    """The report of one algorithm's run."""
    comm = summary["communication"]
    lines = [
        f"# {spec.name} ({spec.mode}): {spec.description}",
        "",
        f"Model: {summary['model']}; {summary['rounds']} rounds, {summary['clients']} clients; "
        f"wall time {summary['timing']['wall_s']:.1f} s.",
        "",
        "## Held-out results",
        "",
        table(
            ["model", *(label for _, label in METRICS)],
            [
                ["base (no tuning)", *_metric_cells(summary["base"])],
                [spec.name, *_metric_cells(result.final)],
            ],
        ),
        "",
        *differences_markdown(_run_intervals(spec.name, summary), [spec.name]),
        *_own_lines(summary),
        "## Per round",
        "",
        table(
            [
                "round",
                *(label for _, label in METRICS),
                "train loss",
                "bytes up",
                "bytes down",
                "wall s",
            ],
            [
                [
                    r.round,
                    *_metric_cells(r.metrics),
                    r.train_loss,
                    r.bytes_up,
                    r.bytes_down,
                    r.wall_s,
                ]
                for r in result.rounds
            ],
        ),
        "",
        f"Traffic in total: {comm['bytes_up']:,} bytes up, {comm['bytes_down']:,} bytes down "
        f"(one adapter is {comm['adapter_bytes']:,} bytes of tensors).",
        "",
    ]
    if result.per_client_final:
        lines += [
            "## Per client (final)",
            "",
            table(
                ["client", *(label for _, label in METRICS)],
                [[i, *_metric_cells(m)] for i, m in enumerate(result.per_client_final)],
            ),
            "",
        ]
    if "synthetic" in summary:
        lines += ["## Self-generated data", "", synthetic_line(summary["synthetic"]), ""]
    lines += ledger_markdown(summary["privacy"])
    lines += ["## Data split", "", partition_table(partition_stats), ""]
    lines += [*(f"- {n}" for n in result.notes), ""] if result.notes else []
    lines += ["## Curves", "", *_plots(plots, folder), ""]
    if result.samples:
        lines += ["## Sample generations (held-out)", "", *_samples(result.samples)]
    return "\n".join(lines)


def _run_intervals(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """A run's summary.json intervals shaped as a comparison's (see differences_markdown)."""
    found = summary.get("intervals")
    if not found or not found["vs"]:
        return {}
    return {"about": found["about"], "references": list(found["vs"]), "runs": {name: found["vs"]}}


def _own_lines(summary: dict[str, Any]) -> list[str]:
    """Each metric's own 95 % interval (bootstrap over the held-out records)."""
    own = summary.get("intervals", {}).get("own", {})
    if not own:
        return []
    shown = [
        f"{label} {own[key]['value']:.4f} [{own[key]['low']:.4f}, {own[key]['high']:.4f}]"
        for key, label in METRICS
        if key in own and own[key]["low"] is not None
    ]
    return [f"Bootstrap 95 % intervals of the final metrics: {'; '.join(shown)}.", ""]


def comparison_markdown(
    runs: list[tuple[AlgorithmSpec, AlgorithmResult, dict[str, Any]]],
    ctx: RunContext,
    plots: list[Path],
    folder: Path,
    intervals: dict[str, Any] | None = None,
) -> str:
    """The side-by-side report of several algorithms on one split and budget, with each one's
    differences to the references (`intervals`: see outputs.comparison_intervals)."""
    cfg = ctx.config
    rows = [["base (no tuning)", "–", *_metric_cells(ctx.base), "–", 0, 0, "–"]]
    for spec, result, summary in runs:
        comm = summary["communication"]
        rows.append(
            [
                f"[{spec.name}]({spec.name}/report.md)",
                spec.mode,
                *_metric_cells(result.final),
                shown_epsilon(largest_epsilon(summary)),
                comm["bytes_up"],
                comm["bytes_down"],
                summary["timing"]["wall_s"],
            ]
        )
    header = [
        "algorithm",
        "mode",
        *(label for _, label in METRICS),
        "record-level ε (max over clients)",
        "bytes up",
        "bytes down",
        "wall s",
    ]
    per_round = [
        [spec.name, r.round, *_metric_cells(r.metrics), r.train_loss]
        for spec, result, _ in runs
        for r in result.rounds
    ]
    lines = [
        f"# {cfg.experiment.name}: {', '.join(spec.name for spec, _, _ in runs)} side by side",
        "",
        f"Model: {ctx.model}. {len(ctx.partition_stats)} clients ({cfg.partition.method}"
        + (f", alpha={cfg.partition.alpha}" if cfg.partition.method == "dirichlet" else "")
        + f"), {cfg.train.rounds} rounds × {cfg.train.local_steps} local steps, batch "
        f"{cfg.train.batch_size}, lr {cfg.train.lr}, LoRA r={cfg.lora.r}; the same seed, split and "
        f"step budget for every algorithm. Held-out set: {cfg.data.eval_size} records.",
        "",
        "## Final held-out results",
        "",
        table(header, rows),
        "",
        *differences_markdown(intervals or {}, [spec.name for spec, _, _ in runs]),
        "## Per round",
        "",
        table(["algorithm", "round", *(label for _, label in METRICS), "train loss"], per_round),
        "",
        "## Data split",
        "",
        partition_table(ctx.partition_stats),
        "",
        "## Notes",
        "",
        *(f"- {spec.name}: {note}" for spec, result, _ in runs for note in result.notes),
        *(
            f"- {spec.name}: {synthetic_line(summary['synthetic'])}"
            for spec, _, summary in runs
            if "synthetic" in summary
        ),
        *(
            f"- {spec.name}: {audit_line(summary['privacy'])}"
            for spec, _, summary in runs
            if "audit" in summary["privacy"]
        ),
        "",
        "## Curves",
        "",
        *_plots(plots, folder),
        "",
    ]
    return "\n".join(lines)
