"""The runner's output contract, checked on LocIT + CenIT (no Flower needed, so fast)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from silotune.config import load_config
from silotune.errors import ConfigError
from silotune.runner import plan_experiment, run_experiment

from .conftest import CONFIGS


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = load_config(
        CONFIGS / "tiny.toml",
        [
            "experiment.algorithms=['locit','cenit']",
            "train.rounds=2",
            "judge.kind='local'",
            "judge.local_model='tiny-llama'",
        ],
    )
    out = tmp_path_factory.mktemp("runs") / "local"
    return run_experiment(plan_experiment(config, out), Console(file=io.StringIO()))


def test_comparison_layout(local_run: Path) -> None:
    assert not local_run.with_name("local.incomplete").exists()
    for name in ("report.md", "comparison.json", "config.json", "plots/eval_loss.png"):
        assert (local_run / name).is_file(), name
    for client in range(3):
        assert (local_run / "partitions" / f"client-{client}.jsonl").is_file()
    report = (local_run / "report.md").read_text()
    assert "| [locit](locit/report.md) | local |" in report
    assert "| [cenit](cenit/report.md) | centralized |" in report
    assert "base (no tuning)" in report
    comparison = json.loads((local_run / "comparison.json").read_text())
    assert set(comparison["runs"]) == {"locit", "cenit"}


@pytest.mark.parametrize("algorithm", ["locit", "cenit"])
def test_run_folder_contract(local_run: Path, algorithm: str) -> None:
    folder = local_run / algorithm
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["algorithm"] == algorithm
    assert summary["rounds"] == 2 and summary["clients"] == 3
    assert summary["data"] == {"source_rows": 480, "dropped": {}}
    assert {"eval_loss", "rouge_l", "perplexity"} <= set(summary["final"])
    assert {"bytes_up", "bytes_down"} <= set(summary["communication"])
    assert summary["timing"]["wall_s"] > 0
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    assert json.loads(lines[-1])["eval_loss"] == summary["final"]["eval_loss"]
    assert (folder / "plots" / "eval_loss.png").stat().st_size > 1000
    assert (folder / "report.md").read_text().startswith(f"# {algorithm}")
    adapters = sorted(p.name for p in (folder / "adapters").iterdir())
    assert adapters == (
        ["client-0", "client-1", "client-2"] if algorithm == "locit" else ["global"]
    )


def test_locit_reports_each_client(local_run: Path) -> None:
    summary = json.loads((local_run / "locit" / "summary.json").read_text())
    per_client = summary["per_client_final"]
    assert len(per_client) == 3
    mean = sum(c["eval_loss"] for c in per_client) / 3
    assert summary["final"]["eval_loss"] == pytest.approx(mean)
    assert summary["communication"]["bytes_up"] == 0


def test_cenit_counts_the_raw_data_it_needs(local_run: Path) -> None:
    summary = json.loads((local_run / "cenit" / "summary.json").read_text())
    pooled = 0
    for client in range(3):
        for line in (local_run / "partitions" / f"client-{client}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            pooled += len((rec["instruction"] + rec["input"] + rec["output"]).encode())
    assert summary["communication"]["bytes_up"] == pooled


def test_judge_win_rate_is_reported(local_run: Path) -> None:
    locit = json.loads((local_run / "locit" / "summary.json").read_text())
    cenit = json.loads((local_run / "cenit" / "summary.json").read_text())
    assert locit["judge"]["items"] == 3 * 8  # every client's model on every held-out item
    assert cenit["judge"]["items"] == 8
    assert "tiny-llama (local" in cenit["judge"]["judge"]
    for summary in (locit, cenit):
        assert 0.0 <= summary["final"]["judge_win_rate"] <= 1.0
        assert "judge_win_rate" in summary["base"]
    assert "judge win rate" in (local_run / "report.md").read_text()


def test_existing_output_is_never_overwritten(local_run: Path) -> None:
    with pytest.raises(ConfigError, match="already exists"):
        plan_experiment(load_config(CONFIGS / "tiny.toml"), local_run)
