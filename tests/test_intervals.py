"""Per-record scores and paired bootstrap intervals: the statistics, a real run, old checkpoints."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from silotune.algorithms import ALGORITHMS
from silotune.checkpoint import RoundCheckpoint, load_result, load_round, save_result, save_round
from silotune.config import load_config
from silotune.evaluation.intervals import (
    Interval,
    mean_over_models,
    own_interval,
    paired_difference,
)
from silotune.jobs import AlgorithmResult, RoundLog
from silotune.repeats import resume
from silotune.report.outputs import comparison_intervals
from silotune.report.terminal import differences_table
from silotune.run_folder import work_folder
from silotune.runner import plan_experiment, run_experiment

from .conftest import CONFIGS


def _scores(seed: int, n: int = 200) -> list[float]:
    return np.random.default_rng(seed).uniform(0.0, 1.0, n).tolist()


def test_the_interval_of_a_known_difference_covers_it() -> None:
    a = _scores(0)
    noise = np.random.default_rng(1).normal(0.0, 0.05, len(a))
    b = (np.asarray(a) - 0.1 + noise - noise.mean()).tolist()  # exactly 0.1 lower on average
    diff = paired_difference({"rouge_l": a}, {"rouge_l": b}, "rouge_l")
    assert diff is not None and diff.low is not None and diff.high is not None
    assert diff.value == pytest.approx(0.1)
    assert diff.low < 0.1 < diff.high
    assert diff.distinguishable and diff.cell().endswith("]*")


def test_a_zero_difference_is_not_distinguishable() -> None:
    a = _scores(2)
    wiggle = [0.05 if i % 2 else -0.05 for i in range(len(a))]  # sums to 0 exactly
    b = [x + w for x, w in zip(a, wiggle, strict=True)]
    diff = paired_difference({"rouge_l": a}, {"rouge_l": b}, "rouge_l")
    assert diff is not None and diff.low is not None and diff.high is not None
    assert diff.value == pytest.approx(0.0, abs=1e-12)
    assert diff.low < 0 < diff.high and not diff.distinguishable
    assert not diff.cell().endswith("*")


def test_identical_models_differ_by_exactly_zero() -> None:
    scores = {"loss": _scores(3), "tokens": [5.0] * 200, "rouge_l": _scores(4)}
    for metric in ("eval_loss", "rouge_l"):
        diff = paired_difference(scores, dict(scores), metric)
        assert diff is not None
        assert (diff.value, diff.low, diff.high) == (0.0, 0.0, 0.0)
        assert not diff.distinguishable and diff.note
    assert paired_difference(scores, scores, "accuracy") is None  # no choices were scored


def test_the_loss_difference_is_a_ratio_of_sums() -> None:
    # Record 0: 10 tokens at loss 2 each; record 1: 1 token at loss 1. Token-weighted: 21 / 11;
    # the mean of the per-record means would be 1.5.
    a = {"loss": [20.0, 1.0, 20.0, 1.0], "tokens": [10.0, 1.0, 10.0, 1.0]}
    b = {"loss": [0.0, 0.0, 0.0, 0.0], "tokens": [10.0, 1.0, 10.0, 1.0]}
    diff = paired_difference(a, b, "eval_loss")
    assert diff is not None and diff.low is not None and diff.high is not None
    assert diff.value == pytest.approx(21 / 11) and diff.value != pytest.approx(1.5)
    assert diff.low <= 21 / 11 <= diff.high
    own = own_interval(a, "eval_loss")
    assert own is not None and own.value == pytest.approx(21 / 11)


def test_degenerate_cases_say_so() -> None:
    one = paired_difference({"rouge_l": [0.5]}, {"rouge_l": [0.2]}, "rouge_l")
    assert one is not None and one.low is None and not one.distinguishable
    assert "no interval: one record" in one.cell()
    # The same difference on every record: no spread to resample, a zero-width interval.
    flat = paired_difference({"accuracy": [1.0] * 6}, {"accuracy": [0.0] * 6}, "accuracy")
    assert flat is not None and flat.low == flat.high == 1.0
    assert paired_difference({"rouge_l": [0.1, 0.2]}, {"rouge_l": [0.1]}, "rouge_l") is None


def test_the_mean_over_models_keeps_the_mean_loss() -> None:
    tokens = [3.0, 7.0, 1.0]
    models = [
        {"loss": [3.0, 14.0, 4.0], "tokens": tokens},
        {"loss": [6.0, 7.0, 2.0], "tokens": tokens},
    ]
    mean = mean_over_models(models)
    losses = [sum(m["loss"]) / sum(tokens) for m in models]
    assert sum(mean["loss"]) / sum(mean["tokens"]) == pytest.approx(sum(losses) / 2)
    assert mean_over_models([models[0], {}]) == {}


@pytest.fixture(scope="module")
def fedit_locit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = load_config(
        CONFIGS / "tiny.toml",
        ["experiment.algorithms=['fedit','locit']", "train.rounds=2", "eval.generate_n=5"],
    )
    out = tmp_path_factory.mktemp("runs") / "intervals"
    return run_experiment(plan_experiment(config, out), Console(file=io.StringIO(), width=300))


def test_a_run_writes_intervals_to_comparison_json_and_reports(fedit_locit: Path) -> None:
    comparison = json.loads((fedit_locit / "comparison.json").read_text())
    intervals = comparison["intervals"]
    assert intervals["records"] == 8 and intervals["references"] == ["base", "locit"]
    fedit = intervals["runs"]["fedit"]
    assert set(fedit) == {"base", "locit"} and set(fedit["base"]) == {"eval_loss", "rouge_l"}
    loss = fedit["base"]["eval_loss"]
    assert set(loss) >= {"diff", "low", "high", "distinguishable"}
    final = comparison["runs"]["fedit"]["final"]["eval_loss"]
    # The per-record sums give back the headline (up to float summation order).
    assert loss["diff"] == pytest.approx(final - comparison["base"]["eval_loss"], abs=1e-5)
    assert loss["low"] <= loss["diff"] <= loss["high"]
    assert set(intervals["runs"]["locit"]) == {"base"}
    summary = json.loads((fedit_locit / "locit" / "summary.json").read_text())
    assert set(summary["intervals"]["vs"]) == {"base"}
    assert len(summary["per_record"]["loss"]) == 8
    # Loss on every record every round; generation on the first 5, at the last round only.
    assert len(summary["per_record"]["rouge_l"]) == 5
    assert intervals["runs"]["fedit"]["base"]["rouge_l"]["records"] == 5
    for name in ("fedit", "locit"):
        rounds = [json.loads(line) for line in (fedit_locit / name / "metrics.jsonl").open()]
        assert ["rouge_l" in r for r in rounds] == [False, True], name
    report = (fedit_locit / "report.md").read_text()
    assert "paired bootstrap 95 % interval over the 8 held-out records" in report
    assert "Δ eval loss vs base" in report and "Δ eval loss vs locit" in report
    run_report = (fedit_locit / "fedit" / "report.md").read_text()
    assert "Δ ROUGE-L vs base" in run_report


def test_checkpoints_without_per_record_scores_still_load(tmp_path: Path) -> None:
    log = RoundLog(round=1, metrics={"eval_loss": 1.0}, train_loss=1.0)
    save_result(tmp_path / "result", AlgorithmResult(rounds=[log], adapters={}))
    data = json.loads((tmp_path / "result" / "result.json").read_text())
    del data["final_per_record"]  # as a result kept before per-record scores existed
    (tmp_path / "result" / "result.json").write_text(json.dumps(data))
    back = load_result(tmp_path / "result")
    assert back is not None and back.final_per_record == {}
    save_round(tmp_path / "round", RoundCheckpoint(round=1, arrays={}, rounds=[log]))
    state = json.loads((tmp_path / "round" / "state.json").read_text())
    del state["per_record"]
    (tmp_path / "round" / "state.json").write_text(json.dumps(state))
    resumed = load_round(tmp_path / "round")
    assert resumed is not None and resumed.per_record == {}


class _Killed(Exception):
    """Stands in for a run killed while LocIT trains."""


def test_a_run_checkpointed_without_per_record_scores_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(
        CONFIGS / "tiny.toml",
        ["experiment.algorithms=['cenit','locit']", "train.rounds=1", "eval.generate=false"],
    )
    console = Console(file=io.StringIO())
    locit = ALGORITHMS.get("locit")

    def killed(job: object) -> AlgorithmResult:
        raise _Killed

    monkeypatch.setitem(ALGORITHMS._items, "locit", dataclasses.replace(locit, run=killed))
    with pytest.raises(_Killed):
        run_experiment(plan_experiment(config, tmp_path / "cut"), console)
    monkeypatch.undo()
    # Make the checkpoints look as they did before per-record scores existed.
    checkpoints = work_folder(tmp_path / "cut") / "checkpoints"
    base = json.loads((checkpoints / "base.json").read_text())
    del base["per_record"]
    (checkpoints / "base.json").write_text(json.dumps(base))
    result_json = checkpoints / "cenit" / "result" / "result.json"
    data = json.loads(result_json.read_text())
    del data["final_per_record"]
    result_json.write_text(json.dumps(data))
    done = resume(work_folder(tmp_path / "cut"), console)
    comparison = json.loads((done / "comparison.json").read_text())
    assert set(comparison["runs"]) == {"cenit", "locit"}
    assert "intervals" not in comparison  # nothing to compare LocIT's scores with
    assert "base" in comparison and "per_record" not in comparison["base"]


def test_a_clients_per_record_scores_are_screened() -> None:
    from silotune.federated.metering import screen_per_record

    good = {"loss": [1.0, 2.0], "tokens": [3, 4]}
    assert screen_per_record(good) == {"loss": [1.0, 2.0], "tokens": [3.0, 4.0]}
    assert screen_per_record({"loss": [1.0, float("nan")], "tokens": [3, 4]}) == {}
    assert screen_per_record({"loss": [1.0], "tokens": [3, 4]}) == {}  # ragged
    assert screen_per_record({"secret": [1.0]}) == {}  # not a score evaluation writes
    assert screen_per_record({"loss": "1.0"}) == {}
    # ROUGE-L covers the first eval.generate_n records; the rest, every held-out record.
    assert screen_per_record({**good, "rouge_l": [0.5]}, records=2)["rouge_l"] == [0.5]
    assert screen_per_record({**good, "rouge_l": [0.5, 0.5, 0.5]}, records=2) == {}
    assert screen_per_record(good, records=3) == {}  # not one score per held-out record


def test_scores_out_of_range_and_uncountable_counts_are_refused() -> None:
    from silotune.data.synthetic import SyntheticStats
    from silotune.federated.metering import screen_per_record

    assert screen_per_record({"loss": [1.0], "tokens": [-3]}) == {}
    assert screen_per_record({"loss": [1.0], "tokens": [3], "rouge_l": [1.5]}) == {}
    stats = SyntheticStats.from_metrics({"synthetic_kept": float("inf"), "synthetic_generated": -2})
    assert (stats.kept, stats.generated) == (0, 0)  # a hostile count does not crash the server


def test_generation_runs_at_the_last_round_and_every_generate_every() -> None:
    from silotune.config_reporting import EvalConfig
    from silotune.evaluation.evaluator import generates

    last_only = EvalConfig()
    assert [generates(last_only, r, 4) for r in (1, 2, 3, 4)] == [False, False, False, True]
    assert generates(last_only, None, 4)  # a one-off evaluation (the base model) generates
    every_2 = EvalConfig(generate_every=2)
    assert [generates(every_2, r, 5) for r in (1, 2, 3, 4, 5)] == [False, True, False, True, True]
    assert not generates(EvalConfig(generate=False), 4, 4)


def test_the_terminal_keeps_each_interval_on_one_line_at_80_columns() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(20, 60, 40).astype(float)

    def scores(shift: float) -> dict[str, list[float]]:
        loss = (tokens * (2.0 + shift + rng.normal(0, 0.05, 40))).tolist()
        return {"loss": loss, "tokens": tokens.tolist(), "rouge_l": _scores(int(shift * 10))}

    found = comparison_intervals(
        {"base": scores(0.3), "locit": scores(0.1), "fedit": scores(0.0)}, ["base", "locit"]
    )
    table = differences_table(found, "differences")
    assert table is not None
    out = io.StringIO()
    Console(file=out, width=80).print(table)
    text = out.getvalue()
    fedit_vs_locit = Interval.from_json(found["runs"]["fedit"]["locit"]["eval_loss"]).cell()
    assert fedit_vs_locit in text  # unbroken: one row per model and reference
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() + "/" + r.split("│")[2].strip() for r in rows] == [
        "locit/base",
        "fedit/base",
        "fedit/locit",
    ]
    assert differences_table({}, "differences") is None


def test_clients_scores_are_averaged_when_generation_covers_fewer_records_than_loss() -> None:
    """FedPIT's headline is the mean of its clients' models: with eval.generate_n below the
    held-out size, ROUGE-L covers fewer records than the loss, and the mean must still form
    (it once came out empty, so FedPIT's comparisons lost their intervals)."""
    from silotune.federated.server import _clients_mean

    server = {"loss": [1.0] * 6, "tokens": [4.0] * 6, "rouge_l": [0.1, 0.2]}
    one = {"loss": [2.0] * 6, "tokens": [4.0] * 6, "rouge_l": [0.2, 0.4]}
    two = {"loss": [4.0] * 6, "tokens": [4.0] * 6, "rouge_l": [0.4, 0.0]}
    short = {"loss": [9.0] * 5, "tokens": [4.0] * 5, "rouge_l": [1.0, 1.0]}  # a record missing
    mean = _clients_mean([one, two, short], server)
    assert mean["loss"] == [3.0] * 6
    assert mean["rouge_l"] == pytest.approx([0.3, 0.2])
    assert _clients_mean([short], server) == {}
