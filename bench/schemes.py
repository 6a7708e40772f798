"""LoRA aggregation schemes against FedAvg, from finished `configs/hetero-medical.toml` runs:
held-out loss with paired differences over records and seeds, what each scheme's averaging
misses, and what travels.

    python bench/schemes.py RUN [RUN ...]      # sweep folders of configs/hetero-medical.toml

Every variant of every sweep folder given (e.g. aggregation=fedavg, aggregation=fedex, ...,
compression=int8) is compared with the first variant of the first folder (FedAvg at rank 8),
seed by seed on the same held-out records: each seed's paired bootstrap difference, their mean
and sd over the seeds with its 95 % t-interval, and in how many seeds the seed's own interval
excludes 0. `product_gap`: the server model's products against the exact weighted mean of the
clients' products, relative to the round's update (last round, mean over seeds). Traffic: bytes
per round as Flower serialised them, up and down, mean over rounds and seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from silotune.report.sweep_pairs import SEED_PREFIX, cell, versus_first


def _variants(folder: Path) -> list[Path]:
    """A sweep folder's variants in sweep order (sweep.json), or the folder itself."""
    sweep = folder / "sweep.json"
    if not sweep.is_file():
        return [folder]
    found = json.loads(sweep.read_text())
    key = found["key"].split(".")[-1]
    return [folder / f"{key}={value}" for value in found["values"]]


def _rows(variant: Path) -> list[list[dict[str, Any]]]:
    """Each seed's metrics.jsonl rows."""
    seeds = sorted(p for p in variant.iterdir() if p.name.startswith(SEED_PREFIX))
    return [
        [json.loads(line) for line in (seed / "metrics.jsonl").read_text().splitlines()]
        for seed in seeds or [variant]
    ]


def _mean(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {sd:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    variants = [v for run in args.runs for v in _variants(run)]
    paired: list[dict[str, dict[str, Any]]] = [{}, *versus_first(variants)]
    table = Table(title=f"against {variants[0].name}, on the same held-out records")
    columns = ("variant", "held-out loss", "Δ loss", "Δ ROUGE-L", "product_gap", "kB up", "kB down")
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right")
    for variant, against in zip(variants, paired, strict=True):
        seeds = _rows(variant)
        last = [rows[-1] for rows in seeds]
        gaps = [float(r["product_gap"]) for r in last if "product_gap" in r]
        up = [float(r["bytes_up"]) for rows in seeds for r in rows]
        down = [float(r["bytes_down"]) for rows in seeds for r in rows]
        found: dict[str, Any] = next(iter(against.values()), {})
        table.add_row(
            variant.name,
            _mean([float(r["eval_loss"]) for r in last]),
            cell(found.get("eval_loss")),
            cell(found.get("rouge_l")),
            f"{statistics.fmean(gaps):.2e}" if gaps else "–",
            f"{statistics.fmean(up) / 1e3:.0f}",
            f"{statistics.fmean(down) / 1e3:.0f}",
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
