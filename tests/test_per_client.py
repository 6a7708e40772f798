"""Each client's own held-out records (partition.client_eval_size), and every final model
scored on every client's records."""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path

import pytest
from rich.console import Console

from silotune.config import load_config
from silotune.data.load import load_records
from silotune.data.partition import split_dataset
from silotune.evaluation.evaluator import build_eval_set, evaluate
from silotune.modeling.adapters import GLOBAL, load_adapter_state
from silotune.runner import plan_experiment, run_experiment

from .conftest import CONFIGS


def test_each_client_holds_out_its_own_records() -> None:
    config = load_config(CONFIGS / "tiny.toml", ["partition.client_eval_size=5"])
    records = load_records(config.data).dataset
    split = split_dataset(records, config.data, config.partition, config.experiment.seed)
    plain = split_dataset(
        records,
        config.data,
        load_config(CONFIGS / "tiny.toml").partition,
        config.experiment.seed,
    )
    assert plain.client_evals == []
    assert [len(e) for e in split.client_evals] == [5, 5, 5]
    for part, held in zip(split.clients, split.client_evals, strict=True):
        trained = set(part["instruction"])
        assert not trained & set(held["instruction"]), "a held-out record is trained on"
        assert not set(held["instruction"]) & set(split.eval["instruction"])
    stats = split.stats()
    assert [row["held_out"] for row in stats] == [5, 5, 5]


@pytest.fixture(scope="module")
def per_client_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = load_config(
        CONFIGS / "tiny.toml",
        [
            "experiment.algorithms=['locit','fedit','fedpit']",
            "train.rounds=1",
            "eval.generate=false",
            "partition.client_eval_size=4",
            "synthetic.per_round=2",
        ],
    )
    out = tmp_path_factory.mktemp("runs") / "per-client"
    return run_experiment(plan_experiment(config, out), Console(file=io.StringIO(), width=200))


def test_every_model_is_scored_on_every_clients_records(per_client_run: Path) -> None:
    for c in range(3):
        held = per_client_run / "partitions" / f"client-{c}-eval.jsonl"
        assert stat.S_IMODE(held.stat().st_mode) == 0o600
    found = {
        name: json.loads((per_client_run / name / "summary.json").read_text())["per_client_eval"]
        for name in ("locit", "fedit", "fedpit")
    }
    for name, scores in found.items():
        matrix = scores["matrix"]
        assert len(matrix) == 3 and all(len(row) == 3 for row in matrix), name
        assert scores["own_mean"] == pytest.approx(sum(matrix[c][c] for c in range(3)) / 3)
        assert len(scores["own_per_record"]["loss"]) == 12
    assert len({tuple(r) for r in found["fedit"]["matrix"]}) == 1  # one shared model
    assert len({tuple(r) for r in found["locit"]["matrix"]}) == 3  # a model per client
    assert len({tuple(r) for r in found["fedpit"]["matrix"]}) == 3  # + each one's private
    comparison = json.loads((per_client_run / "comparison.json").read_text())
    per_client = comparison["per_client"]
    assert per_client["records"] == 12
    assert set(per_client["runs"]["fedit"]) == {"base", "locit"}
    report = (per_client_run / "report.md").read_text()
    assert "## Each client's own distribution" in report
    assert "locit: held-out loss of each client's model" in report


def test_a_cell_is_the_loss_of_that_model_on_those_records(  # type: ignore[no-untyped-def]
    per_client_run: Path, tiny_bench
) -> None:
    """The shared FedIT model, rescored by hand on client 1's records, gives the matrix's cell."""
    config = load_config(per_client_run / "config.json")
    records = [
        json.loads(line) for line in (per_client_run / "partitions" / "client-1-eval.jsonl").open()
    ]
    import datasets

    eval_set = build_eval_set(
        datasets.Dataset.from_list(records), tiny_bench.tokenizer, config.data
    )
    state = load_adapter_state(per_client_run / "fedit" / "adapters" / GLOBAL)
    tiny_bench.put(GLOBAL, state)
    tiny_bench.use([GLOBAL])
    by_hand = evaluate(tiny_bench.model, tiny_bench.tokenizer, eval_set, config.eval, 0, False)
    summary = json.loads((per_client_run / "fedit" / "summary.json").read_text())
    assert summary["per_client_eval"]["matrix"][0][1] == pytest.approx(by_hand.eval_loss, rel=1e-5)
