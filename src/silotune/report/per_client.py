"""The per-client view of a comparison: each client's model on its own held-out records, with
paired intervals, and how much each local model has specialised (partition.client_eval_size)."""

from __future__ import annotations

from typing import Any

from silotune.evaluation.intervals import PerRecord
from silotune.report.markdown import difference_cells, difference_columns, table

ABOUT = (
    "Each client's model (the shared one, its own local one, or FedPIT's global + its private "
    "adapter) on that client's own held-out records, all clients' records pooled. "
)


def own_scores(summaries: dict[str, dict[str, Any]]) -> dict[str, PerRecord]:
    """algorithm -> its clients' models' per-record scores on their own held-out records."""
    return {
        name: s["per_client_eval"]["own_per_record"]
        for name, s in summaries.items()
        if "own_per_record" in s.get("per_client_eval", {})
    }


def per_client_markdown(
    intervals: dict[str, Any], summaries: dict[str, dict[str, Any]], base_own: float
) -> list[str]:
    """The "Each client's own distribution" section (nothing when no client held records out)."""
    scored = {n: s["per_client_eval"] for n, s in summaries.items() if "per_client_eval" in s}
    if not scored:
        return []
    columns = difference_columns(intervals)
    rows = [["base (no tuning)", f"{base_own:.4f}", "–", "–"] + ["–"] * len(columns)]
    for name, found in scored.items():
        if "not_scored" in found:
            rows.append([name, found["not_scored"], "–", "–"] + ["–"] * len(columns))
            continue
        others = found["others_mean"]
        rows.append(
            [
                name,
                f"{found['own']['eval_loss']:.4f}",
                f"{found['own_mean']:.4f}",
                f"{others:.4f}" if others is not None else "–",
                *difference_cells(intervals.get("runs", {}).get(name, {}), columns),
            ]
        )
    header = [
        "algorithm",
        "own held-out loss (pooled)",
        "mean over clients: own",
        "others' records",
        *(h for _, _, h in columns),
    ]
    matrices = [
        _matrix(name, found["matrix"])
        for name, found in scored.items()
        if "matrix" in found and len({tuple(r) for r in found["matrix"]}) > 1  # own models
    ]
    records: list[int] = next(iter(f["records"] for f in scored.values() if "records" in f), [])
    return [
        "## Each client's own distribution",
        "",
        ABOUT
        + f"Held-out records per client: {', '.join(map(str, records))}. "
        + "'others' records': the mean loss of a client's model on the other clients' held-out "
        "records (above its own: the model has specialised to its client). "
        + str(intervals.get("about", "")),
        "",
        table(header, rows),
        "",
        *(line for m in matrices for line in m),
    ]


def _matrix(name: str, matrix: list[list[float]]) -> list[str]:
    n = len(matrix)
    rows = [[f"client {c}'s model", *(f"{v:.4f}" for v in row)] for c, row in enumerate(matrix)]
    return [
        f"{name}: held-out loss of each client's model (rows) on each client's records (columns)",
        "",
        table(["", *(f"client {d}" for d in range(n))], rows),
        "",
    ]
