"""A sweep's values against its first: each algorithm's paired difference on the same held-out
records, seed by seed, and with experiment.seeds the mean over the seeds.

Every value of a sweep evaluates each algorithm on the shared held-out set; where those records
are the same for two values (the sweep changed neither the data nor the split: the per-record
token counts agree), the difference of a metric between the values is resampled record by
record, as the report's differences to the base model are. A sweep whose values change the
held-out records (data.eval_size, say) shows no such column.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from silotune.evaluation.intervals import (
    PER_RECORD,
    SCORED,
    TOKENS,
    Interval,
    PerRecord,
    over_seeds,
    paired_difference,
    seeds_cell,
)

SEED_PREFIX = "seed="  # a repetition's folder (see silotune.config.seed_variants)


def per_record_runs(folder: Path) -> dict[str, dict[str, PerRecord]]:
    """seed folder ("" without seeds) -> algorithm -> its per-record held-out scores."""
    seeds = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(SEED_PREFIX))
    if seeds:
        return {p.name: _algorithms(p) for p in seeds}
    return {"": _algorithms(folder)}


def _algorithms(folder: Path) -> dict[str, PerRecord]:
    summaries = [folder / "summary.json"] if (folder / "summary.json").is_file() else []
    summaries = summaries or sorted(folder.glob("*/summary.json"))
    out = {}
    for path in summaries:
        summary = json.loads(path.read_text())
        if scores := summary.get(PER_RECORD):
            out[str(summary["algorithm"])] = scores
    return out


def versus_first(folders: list[Path]) -> list[dict[str, dict[str, Any]]]:
    """For each folder after the first: algorithm -> metric -> its difference to the first
    folder's, {diff, low, high, ...} with one seed, an over_seeds result with several."""
    runs = [per_record_runs(folder) for folder in folders]
    first = runs[0]
    out = []
    for other in runs[1:]:
        found: dict[str, dict[str, Any]] = {}
        for name in {n for algorithms in other.values() for n in algorithms}:
            per_metric: dict[str, dict[str, dict[str, Any]]] = {}
            for seed, algorithms in other.items():
                ours, theirs = algorithms.get(name), first.get(seed, {}).get(name)
                if not ours or not theirs or ours.get(TOKENS) != theirs.get(TOKENS):
                    continue  # not run, or not the same records
                for metric in SCORED:
                    if (diff := paired_difference(ours, theirs, metric)) is not None:
                        per_metric.setdefault(metric, {})[seed] = diff.to_json()
            found[name] = {m: s[""] if "" in s else over_seeds(s) for m, s in per_metric.items()}
        out.append(found)
    return out


def cell(found: dict[str, Any] | None) -> str:
    """A difference as a report cell: with its interval, or over seeds."""
    if not found:
        return "–"
    return seeds_cell(found) if "per_seed" in found else Interval.from_json(found).cell()
