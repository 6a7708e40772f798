"""experiment.seeds: the whole experiment once per seed, a report of the spread, and resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from silotune import repeats, runner
from silotune.config import load_config, seed_variants
from silotune.errors import ConfigError

from .conftest import CONFIGS

_FAST = ["experiment.algorithms=['locit','cenit']", "train.rounds=1", "eval.generate=false"]


class _Killed(Exception):
    """Stands in for a SIGTERM half-way through the seeds."""


def test_each_seed_variant_holds_its_one_seed() -> None:
    config = load_config(CONFIGS / "tiny.toml", ["experiment.seeds=[3, 1]"])
    variants = seed_variants(config)
    assert [label for label, _ in variants] == ["seed=3", "seed=1"]
    assert [(v.experiment.seed, v.experiment.seeds) for _, v in variants] == [(3, ()), (1, ())]
    with pytest.raises(ConfigError, match="distinct seeds"):
        load_config(CONFIGS / "tiny.toml", ["experiment.seeds=[1, 1]"])


def test_seeds_run_resume_and_report_their_spread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(
        CONFIGS / "tiny.toml",
        [*_FAST, "experiment.seeds=[0, 1, 2]", "partition.client_eval_size=3"],
    )
    console = Console(file=io.StringIO(), width=200)
    ran: list[int] = []
    real = runner.run_experiment

    def killed_at_seed_2(exp, *args, **kwargs):  # type: ignore[no-untyped-def]
        if exp.config.experiment.seed == 2:
            raise _Killed
        ran.append(exp.config.experiment.seed)
        return real(exp, *args, **kwargs)

    monkeypatch.setattr(repeats, "run_experiment", killed_at_seed_2)
    out = tmp_path / "seeds"
    with pytest.raises(_Killed):
        repeats.run(config, out, console)
    work = out.with_name("seeds.incomplete")
    assert (work / "seed=0").is_dir() and (work / "seed=1").is_dir() and not out.exists()
    with pytest.raises(Exception, match="interrupted run"):  # a rerun never starts over
        repeats.run(config, out, console)

    def counted(exp, *args, **kwargs):  # type: ignore[no-untyped-def]
        ran.append(-1)
        return real(exp, *args, **kwargs)

    monkeypatch.setattr(repeats, "run_experiment", counted)
    repeats.resume(work, console)
    assert ran == [0, 1, -1], "a resumed run must run only the seed that had not finished"
    assert not work.exists()
    splits = [
        json.loads((out / f"seed={s}" / "partitions" / "stats.json").read_text()) for s in range(3)
    ]
    assert splits[0] != splits[1], "each seed must split the data anew"
    seeds = json.loads((out / "seeds.json").read_text())
    assert seeds["seeds"] == [0, 1, 2]
    losses = [
        json.loads((out / f"seed={s}" / "comparison.json").read_text())["runs"]["locit"]["final"][
            "eval_loss"
        ]
        for s in range(3)
    ]
    final = seeds["runs"]["locit"]["final"]["eval_loss"]
    assert final["mean"] == pytest.approx(sum(losses) / 3)
    assert final["min"] == min(losses) and final["max"] == max(losses) and final["sd"] > 0
    diff = seeds["runs"]["cenit"]["vs"]["base"]["eval_loss"]
    assert set(diff["per_seed"]) == {"0", "1", "2"}
    assert diff["low"] <= diff["mean"] <= diff["high"]
    assert 0 <= diff["distinguishable_seeds"] <= 3
    assert "vs locit" in (out / "report.md").read_text()
    report = (out / "report.md").read_text()
    assert report.startswith("# 3 seeds: 0, 1, 2") and "± " in report and "/3 seeds)" in report
    assert (out / "plots" / "seeds_eval_loss.png").is_file()
    own = seeds["runs"]["cenit"]["per_client"]
    assert own["own"]["seeds"] == 3 and set(own["vs"]) == {"base", "locit"}
    assert "## Each client's own distribution, over the seeds" in report


def test_a_sweep_repeats_each_value_over_the_seeds(tmp_path: Path) -> None:
    config = load_config(
        CONFIGS / "tiny.toml",
        [
            *_FAST,
            "experiment.seeds=[0, 1]",
            "sweep.key='partition.alpha'",
            "sweep.values=[0.5, 50]",
        ],
    )
    out = repeats.run(config, tmp_path / "sweep", Console(file=io.StringIO()))
    for value in ("0.5", "50"):
        point = out / f"alpha={value}"
        assert (point / "seed=0" / "locit" / "summary.json").is_file()
        assert json.loads((point / "seeds.json").read_text())["seeds"] == [0, 1]
    sweep = json.loads((out / "sweep.json").read_text())
    mean = json.loads((out / "alpha=50" / "seeds.json").read_text())["runs"]["locit"]["final"]
    assert sweep["values"]["50"]["locit"]["final"]["eval_loss"] == mean["eval_loss"]["mean"]
    assert sweep["values"]["50"]["locit"]["spread"]["eval_loss"] == mean["eval_loss"]["sd"]
    assert "± one standard deviation over the seeds" in (out / "report.md").read_text()
