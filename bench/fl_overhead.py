"""Flower round overhead and traffic of FedIT, measured side by side in one run.

    python bench/fl_overhead.py                       # tiny preset, 5 rounds
    python bench/fl_overhead.py --config configs/demo.toml --rounds 3 --set train.local_steps=4

Prints, per round: round wall time (Flower messaging + client training + aggregation) divided by
the sum of the clients' own training time, and bytes up/down divided by one adapter's size.
Round 1 includes starting the simulation workers and loading the model in them, so the summary
also gives the steady-state ratio over rounds 2..N.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from silotune import logs
from silotune.config import load_config
from silotune.procs import run_command
from silotune.runner import plan_experiment, run_experiment

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.toml")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    logs.install()
    config = load_config(
        args.config,
        [
            "experiment.algorithms=['fedit']",
            f"train.rounds={args.rounds}",
            "eval.generate=false",
            *args.overrides,
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = run_experiment(
            plan_experiment(config, Path(tmp) / "run"), Console(file=io.StringIO())
        )
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())
    adapter = summary["communication"]["adapter_bytes"]
    clients = summary["clients"]

    table = Table(
        title=f"FedIT on {summary['model']}: {clients} clients, "
        f"{config.train.local_steps} local steps per round"
    )
    for col in (
        "round",
        "round s",
        "sum client train s",
        "overhead ratio",
        "up ÷ adapter",
        "down ÷ adapter",
        "serialised up ÷ adapter",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        train_s = sum(c["train_s"] for c in r["clients"])
        table.add_row(
            str(r["round"]),
            f"{r['wall_s']:.3f}",
            f"{train_s:.3f}",
            f"{r['wall_s'] / train_s:.3f}",
            f"{r['tensor_bytes_up'] / adapter:.3f}",
            f"{r['tensor_bytes_down'] / adapter:.3f}",
            f"{r['bytes_up'] / adapter:.4f}",
        )
    console = Console(width=120)
    console.print(table)
    steady = rows[1:] or rows
    wall = sum(r["wall_s"] for r in steady)
    train = sum(c["train_s"] for r in steady for c in r["clients"])
    console.print(
        f"steady state (rounds {steady[0]['round']}..{steady[-1]['round']}): round time ÷ client "
        f"training time = {wall / train:.3f} (goal ≤ 1.10); adapter = {adapter:,} bytes; "
        f"per round {clients} clients × 1 adapter each way = "
        f"{steady[0]['tensor_bytes_up'] / adapter:.3f} up, "
        f"{steady[0]['tensor_bytes_down'] / adapter:.3f} down"
    )


if __name__ == "__main__":  # SIGTERM stops it as Ctrl-C does: no server or key is left
    sys.exit(run_command(lambda: main() or 0, "free space and run it again"))
