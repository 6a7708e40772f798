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
from silotune.report.sweep_pairs import cell, versus_first

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
    # The held-out records do not depend on alpha: alpha = 50 is compared with 0.5 on them.
    assert "Δ eval loss vs partition.alpha = 0.5" in report
    versus = sweep["versus_first"]
    assert versus["0.5"] == {} and set(versus["50"]) == {"locit", "cenit"}
    assert versus["50"]["cenit"]["eval_loss"]["records"] == 8


def _summary(folder: Path, name: str, loss: list[float], tokens: list[float]) -> None:
    folder.mkdir(parents=True)
    per_record = {"loss": loss, "tokens": tokens}
    (folder / "summary.json").write_text(json.dumps({"algorithm": name, "per_record": per_record}))


def test_sweep_values_are_paired_with_the_first_seed_by_seed(tmp_path: Path) -> None:
    tokens = [10.0] * 6
    first = [20.0, 25.0, 30.0, 22.0, 28.0, 24.0]
    for seed, shift in ((0, -1.0), (1, -2.0), (2, -1.5)):
        _summary(tmp_path / "a" / f"seed={seed}", "fedit", first, tokens)
        # Every record lower by `shift`, less on every other one: about 0.1 a token.
        better = [x + shift + 0.3 * (i % 2) for i, x in enumerate(first)]
        _summary(tmp_path / "b" / f"seed={seed}", "fedit", better, tokens)
    # Other records (another eval set): no paired difference is claimed.
    _summary(tmp_path / "c" / "seed=0", "fedit", first[:5], tokens[:5])
    b, c = versus_first([tmp_path / "a", tmp_path / "b", tmp_path / "c"])
    found = b["fedit"]["eval_loss"]
    assert [round(found["per_seed"][f"seed={s}"]["diff"], 4) for s in range(3)] == [
        -0.085,
        -0.185,
        -0.135,
    ]
    assert found["mean"] == pytest.approx(-0.135) and found["high"] < 0
    assert found["distinguishable_seeds"] == 3
    assert c == {"fedit": {}}
    assert cell(found).endswith("(3/3 seeds)")
