"""Sweeps: one full experiment per value, and a report that puts them side by side."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from silotune.config import load_config, sweep_variants
from silotune.errors import ConfigError
from silotune.repeats import run_sweep

from .conftest import CONFIGS


def test_variants_apply_each_value_as_typed_config() -> None:
    config = load_config(
        CONFIGS / "tiny.toml", ["sweep.key='partition.alpha'", "sweep.values=[0.1, 10]"]
    )
    variants = sweep_variants(config)
    assert [label for label, _ in variants] == ["alpha=0.1", "alpha=10"]
    assert [v.partition.alpha for _, v in variants] == [0.1, 10.0]
    assert all(not v.sweep.key for _, v in variants)
    assert all(v.train == config.train for _, v in variants)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sweep.key='partition.alpha'"], "needs both sweep.key"),
        (["sweep.values=[1]"], "needs both sweep.key"),
        (["sweep.key='partition.alpah'", "sweep.values=[1]"], "did you mean 'alpha'"),
        (["sweep.key='partition.alpha'", "sweep.values=[-1]"], "partition.alpha must be > 0"),
        (["sweep.key='experiment.seed'", "sweep.values=[1]"], "sweep a setting"),
    ],
)
def test_bad_sweeps_are_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny.toml", overrides)


def test_sweep_runs_every_value_and_reports(tmp_path: Path) -> None:
    config = load_config(
        CONFIGS / "tiny.toml",
        [
            "experiment.algorithms=['locit','cenit']",
            "train.rounds=1",
            "eval.generate=false",
            "sweep.key='partition.alpha'",
            "sweep.values=[0.5, 50]",
        ],
    )
    out = run_sweep(config, tmp_path / "sweep", Console(file=io.StringIO()))
    for label in ("alpha=0.5", "alpha=50"):
        assert json.loads((out / label / "locit" / "summary.json").read_text())["rounds"] == 1
    stats = [
        json.loads((out / f"alpha={v}" / "partitions" / "stats.json").read_text())
        for v in (0.5, 50)
    ]
    assert stats[0] != stats[1], "different alphas must give different splits"
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["key"] == "partition.alpha" and set(sweep["values"]) == {"0.5", "50"}
    report = (out / "report.md").read_text()
    assert "# Sweep over partition.alpha" in report and report.count("| 50 |") == 2
    assert (out / "plots" / "sweep_eval_loss.png").is_file()
    assert not out.with_name("sweep.incomplete").exists()
