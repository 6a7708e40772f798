"""Write a finished algorithm's run folder and, for several algorithms, their comparison.

A run folder is the contract other tools read:
    summary.json      algorithm, mode, rounds, clients, final metrics, communication, timing
    metrics.jsonl     one line per round
    adapters/<name>/  stock PEFT adapter folders
    report.md, plots/*.png
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from silotune import __version__
from silotune.evaluation.intervals import (
    BASE,
    PER_RECORD,
    PerRecord,
    compare,
    comparison_json,
    describe,
    own_intervals,
    records_of,
)
from silotune.jobs import AlgorithmResult, AlgorithmSpec
from silotune.modeling.adapters import write_peft_folder
from silotune.privacy.accounting import run_ledger
from silotune.privacy.ledger import Ledger
from silotune.report.context import RunContext
from silotune.report.markdown import comparison_markdown, run_markdown
from silotune.report.per_client import per_client_markdown
from silotune.report.plots import plot_curves, plot_epsilon
from silotune.report.synthetic import generator_markdown
from silotune.run_folder import RunFolder, write_atomic, write_json


def summarize(
    spec: AlgorithmSpec,
    result: AlgorithmResult,
    ctx: RunContext,
    ledger: Ledger,
    wall_s: float,
    audit: dict[str, Any] | None = None,
    base_per_record: PerRecord | None = None,
) -> dict[str, Any]:
    """The summary.json of one algorithm's run (`audit`: its canary audit, if any)."""
    return {
        "algorithm": spec.name,
        "mode": spec.mode,
        "rounds": len(result.rounds),
        "clients": len(ctx.partition_stats),
        "data": ctx.data_rows,
        "final": result.final,
        "base": ctx.base,
        "per_client_final": result.per_client_final,
        **_intervals(spec.name, result.final_per_record, base_per_record or {}),
        "communication": {
            **result.bytes(),
            "adapter_bytes": ctx.adapter_bytes,
            # How many adapters' worth of tensors went up each round: the clients' count when
            # exactly one shared adapter (and nothing private) is uploaded per client.
            "adapters_up_per_round": [
                round(r.tensor_bytes_up / ctx.adapter_bytes, 4) for r in result.rounds
            ],
        },
        "timing": {"wall_s": round(wall_s, 2)},
        "privacy": {**ledger.summary(), **({"audit": audit} if audit else {})},
        **({"synthetic": result.synthetic.to_json()} if result.synthetic else {}),
        **({"judge": dataclasses.asdict(result.judge)} if result.judge else {}),
        **({"per_client_eval": result.per_client_eval} if result.per_client_eval else {}),
        "model": ctx.model,
        "strategy": ctx.config.federated.strategy if spec.mode == "federated" else None,
        "config_fingerprint": ctx.config.fingerprint(),
        "silotune_version": __version__,
    }


def write_run(
    folder: Path,
    spec: AlgorithmSpec,
    result: AlgorithmResult,
    ctx: RunContext,
    save_adapter: Any,
    wall_s: float,
    audit: dict[str, Any] | None = None,
    base_per_record: PerRecord | None = None,
) -> dict[str, Any]:
    """Write one algorithm's run folder; `save_adapter(state, path)` writes PEFT folders;
    `audit` is its canary audit (see silotune.privacy.audit), if the run has one;
    `base_per_record`: the base model's per-record scores, the reference of its intervals."""
    run = RunFolder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, state in result.adapters.items():
        run.adapters.mkdir(exist_ok=True)
        if result.adapter_config is not None:
            write_peft_folder(run.adapters / name, state, result.adapter_config)
        else:
            save_adapter(state, run.adapters / name)
    records = {int(s["client"]): int(s["size"]) for s in ctx.partition_stats}
    ledger = run_ledger(ctx.config, spec.releases(ctx.config), result.rounds, records)
    rows = [log.to_json() for log in result.rounds]
    lines = [{**row, "privacy": ledger.rows(row["round"])} for row in rows]
    write_atomic(run.metrics, "".join(json.dumps(line) + "\n" for line in lines).encode("utf-8"))
    summary = summarize(spec, result, ctx, ledger, wall_s, audit, base_per_record)
    own = {spec.name: summary.get("intervals", {}).get("own", {})}
    plots = plot_curves({spec.name: rows}, ctx.base, run.plots, own)
    plots += plot_epsilon(ledger.rows(), run.plots)
    markdown = "\n".join(
        [
            run_markdown(spec, result, summary, ctx.partition_stats, plots, folder),
            *generator_markdown(spec.name, result.rounds, folder),
        ]
    )
    write_atomic(run.report, markdown.encode("utf-8"))
    # Last: a summary.json marks the folder as a finished result.
    write_json(run.summary, summary)
    return summary


def write_comparison(
    folder: Path,
    runs: list[tuple[AlgorithmSpec, AlgorithmResult, dict[str, Any]]],
    ctx: RunContext,
    intervals: dict[str, Any] | None = None,
    per_client: dict[str, Any] | None = None,
) -> None:
    """Side-by-side report of several algorithms run on the same split and budget;
    `intervals`: comparison_intervals of their per-record scores; `per_client`: of their
    clients' models on the clients' own held-out records."""
    run = RunFolder(folder)
    series = {spec.name: [log.to_json() for log in result.rounds] for spec, result, _ in runs}
    own = {spec.name: s.get("intervals", {}).get("own", {}) for spec, _, s in runs}
    plots = plot_curves(series, ctx.base, run.plots, own)
    markdown = comparison_markdown(runs, ctx, plots, folder, intervals)
    if per_client:
        summaries = {spec.name: summary for spec, _, summary in runs}
        section = per_client_markdown(per_client, summaries, per_client["base_eval_loss"])
        markdown = markdown.replace("## Per round\n", "\n".join([*section, "## Per round", ""]), 1)
    write_atomic(run.report, markdown.encode("utf-8"))
    write_json(
        run.comparison,
        {
            "base": ctx.base,
            "runs": {spec.name: summary for spec, _, summary in runs},
            **({"intervals": intervals} if intervals else {}),
            **({"per_client": per_client} if per_client else {}),
        },
    )


def comparison_intervals(scores: dict[str, PerRecord], references: Sequence[str]) -> dict[str, Any]:
    """Each model's difference to each reference with its interval, as comparison.json keeps it:
    {about, records, references, runs: model -> reference -> metric -> {diff, low, high, ...}}.
    `scores`: model name ("base" for the untuned model) -> its per-record scores."""
    records = records_of(scores)
    found = comparison_json(compare(scores, references))
    if not found:
        return {}
    shown = [ref for ref in references if any(ref in refs for refs in found.values())]
    return {"about": describe(records), "records": records, "references": shown, "runs": found}


def _intervals(name: str, own: PerRecord, base: PerRecord) -> dict[str, Any]:
    """summary.json's per-record scores and intervals (nothing when the run has no scores)."""
    if not own:
        return {}
    found = comparison_intervals({name: own, BASE: base}, [BASE])
    return {
        PER_RECORD: own,
        "intervals": {
            "about": describe(records_of({name: own})),
            "records": records_of({name: own}),
            "vs": found["runs"][name] if found else {},
            "own": own_intervals(own),
        },
    }
