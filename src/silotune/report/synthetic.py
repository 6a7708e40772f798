"""report.md's "What the generator wrote": the figures clients sent each round, and the
nearest-record ROUGE-L they kept on their own disks, with its histogram."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from silotune.data.synthetic_quality import QUALITY_KEYS, read_nearest
from silotune.jobs import RoundLog
from silotune.report.markdown import table
from silotune.report.plots import plt, save_figure
from silotune.run_folder import RunFolder

# (metric key, column) of the per-round table, averaged over the clients that kept an example.
_COLUMNS = (
    ("synthetic_distinct_1", "distinct-1"),
    ("synthetic_distinct_2", "distinct-2"),
    ("synthetic_instruction_words", "instruction words"),
    ("synthetic_response_words", "response words"),
)
# A kept instruction this close to a local one shares most of its words with it.
_CLOSE = 0.5


def generator_markdown(algorithm: str, rounds: Sequence[RoundLog], folder: Path) -> list[str]:
    """The section for result folder `folder` (nothing when no client reported the figures);
    writes the histogram into its plots/."""
    rows = [row for log in rounds if (row := _round_row(log))]
    if not rows:
        return []
    lines = [
        "## What the generator wrote",
        "",
        "Per round, the mean over clients of the kept count; diversity (distinct n-grams over the "
        "kept instructions and responses), mean lengths in words and the judge's rating (when "
        "the judge filter rated them) over the clients that kept an example.",
        "",
        table(["round", "kept", *(c for _, c in _COLUMNS), "judge score"], rows),
        "",
    ]
    run = RunFolder(folder)
    files = run.experiment.synthetic_files(algorithm)
    scores = read_nearest(files)
    where = f"`clients/client-N/synthetic/{algorithm}/round-K.jsonl`"
    if not files:
        return [*lines, f"No client's {where} is on this machine: the clients keep them.", ""]
    if not scores:
        return [*lines, "No client kept an example: no nearest-record ROUGE-L to show.", ""]
    close = sum(s >= _CLOSE for s in scores) / len(scores)
    p50, p90 = np.quantile(scores, [0.5, 0.9])
    plot = plot_nearest(scores, run.plots)
    return [
        *lines,
        "Nearest-record ROUGE-L (each kept instruction against the client's closest local "
        "instruction; a leakage proxy, 1.0 is a copy): computed on each client and written to its "
        f"own disk ({where}, mode 0600) with the examples; never sent to the server. The runner "
        "reads it here because a simulation's clients share its machine.",
        "",
        f"{len(scores)} examples: mean {np.mean(scores):.3f}, median {p50:.3f}, 90th percentile "
        f"{p90:.3f}, max {max(scores):.3f}; {close:.0%} at or above {_CLOSE}.",
        "",
        f"![{plot.stem}]({plot.relative_to(folder).as_posix()})",
        "",
    ]


def _round_row(log: RoundLog) -> list[Any]:
    reporting = [c for c in log.clients if all(k in c for k in ("synthetic_kept", *QUALITY_KEYS))]
    if not reporting:
        return []
    wrote = [c for c in reporting if c["synthetic_kept"] > 0]
    judged = [c for c in wrote if c["synthetic_judged"] > 0]
    return [
        log.round,
        float(np.mean([c["synthetic_kept"] for c in reporting])),
        *(float(np.mean([c[k] for c in wrote])) if wrote else "–" for k, _ in _COLUMNS),
        float(np.mean([c["synthetic_judge_score"] for c in judged])) if judged else "–",
    ]


def plot_nearest(scores: Sequence[float], folder: Path) -> Path:
    """Histogram of the nearest-record ROUGE-L of every kept example, all clients and rounds."""
    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(scores, bins=[i / 20 for i in range(21)], edgecolor="white")
    ax.axvline(_CLOSE, linestyle="--", color="grey")
    ax.set_xlabel("ROUGE-L F to the nearest local instruction")
    ax.set_ylabel("kept synthetic examples")
    ax.set_title("how close the generator stayed to the records")
    ax.grid(alpha=0.3)
    return save_figure(fig, folder / "nearest_rouge_l.png")
