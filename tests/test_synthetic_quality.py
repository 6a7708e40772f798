"""What the generator wrote: sendable figures, the nearest-record ROUGE-L kept on the client's
disk (never in its reply), and the report's section."""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from silotune.algorithms import fedpit
from silotune.config import load_config
from silotune.config_synthetic import SyntheticConfig
from silotune.data.load import as_records, load_records
from silotune.data.sft import tokenize_dataset
from silotune.data.synthetic import Candidate, SyntheticStats, filter_candidates
from silotune.data.synthetic_quality import (
    NEAREST,
    QUALITY_KEYS,
    RatedJudge,
    distinct_n,
    nearest_rouge_l,
    quality_metrics,
    write_round,
)
from silotune.federated.local import LocalRequest
from silotune.jobs import RoundLog
from silotune.modeling.load import resolve_model
from silotune.report.synthetic import generator_markdown
from silotune.run_folder import client_synthetic_file
from silotune.runner import plan_experiment, run_experiment
from silotune.training.workbench import Workbench

from .conftest import CONFIGS

KEPT = [
    {"instruction": "x y x", "input": "", "output": "y x"},
    {"instruction": "What treats a migraine ?", "input": "adult", "output": "Rest and water ."},
]
LOCAL = [
    {"instruction": "What treats a migraine ?", "input": "", "output": "Triptans."},
    {"instruction": "Who gets gout ?", "input": "", "output": "Older men, mostly."},
]


class _Judge:
    label = "fixed"

    def compare(self, question: str, first: str, second: str) -> None:
        return None

    def rate(self, question: str, answer: str) -> float | None:
        return None if answer == "a" else 0.75


def test_distinct_n_and_lengths_on_hand_made_records() -> None:
    # Unigrams a b a | b a: 2 distinct of 5; bigrams ab ba | ba: 2 of 3.
    assert distinct_n(["a b a", "B a"], 1) == pytest.approx(2 / 5)
    assert distinct_n(["a b a", "B a"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a", ""], 2) == 0.0
    metrics = quality_metrics(KEPT[:1])
    assert metrics == {
        "synthetic_distinct_1": pytest.approx(2 / 5),
        "synthetic_distinct_2": pytest.approx(2 / 3),
        "synthetic_instruction_words": 3.0,
        "synthetic_response_words": 2.0,
        "synthetic_judge_score": 0.0,
        "synthetic_judged": 0.0,
    }
    # Nothing kept: the same keys (every client reports them), all 0.0.
    assert quality_metrics([]) == dict.fromkeys(QUALITY_KEYS, 0.0)


def test_the_judge_score_reuses_the_filters_ratings() -> None:
    assert RatedJudge.around(None) is None  # the judge filter is off: no score
    judge = RatedJudge(_Judge())
    candidates = [
        Candidate("What soothes a sore throat ?", "", "Warm tea with honey helps.", True, True),
        Candidate("What soothes a sore back now ?", "", "a", True, True),
    ]
    cfg = SyntheticConfig(judge_min_score=0.5, min_response_words=1)
    kept, _ = filter_candidates(candidates, [], cfg, judge=judge)
    assert len(kept) == 1 and judge.ratings == {(kept[0]["instruction"], kept[0]["output"]): 0.75}
    metrics = quality_metrics(kept, judge)
    assert metrics["synthetic_judge_score"] == 0.75
    assert metrics["synthetic_judged"] == 1.0


def test_nearest_rouge_l_of_a_copy_is_one() -> None:
    near = nearest_rouge_l(KEPT, LOCAL)
    assert near[1] == 1.0
    assert near[0] == 0.0
    assert nearest_rouge_l(KEPT, []) == [0.0, 0.0]


def test_fedpit_round_keeps_the_nearest_rouge_l_on_the_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def generate(*args: object, **kwargs: object) -> tuple[list[dict[str, str]], SyntheticStats]:
        return [dict(r) for r in KEPT], SyntheticStats(generated=3, kept=len(KEPT))

    monkeypatch.setattr(fedpit, "self_generate", generate)
    monkeypatch.setattr(fedpit, "save_adapter", lambda *a, **k: None)
    config = load_config(CONFIGS / "tiny.toml", ["experiment.algorithms=['fedpit']"])
    bench = Workbench(resolve_model(config.model), config, private=True)
    records = [*LOCAL, *as_records(load_records(config.data).dataset)[:6]]
    req = LocalRequest(
        bench=bench,
        config=config,
        client=0,
        round=2,
        global_state=bench.initial,
        store={},
        records=records,
        examples=tokenize_dataset(records, bench.tokenizer, "alpaca", config.data.max_length),
        client_dir=tmp_path / "client-0",
    )
    reply = fedpit.fedpit_round(req)
    assert set(QUALITY_KEYS) <= set(reply.metrics)
    assert reply.metrics["synthetic_instruction_words"] == 4.0  # (3 + 5) / 2
    assert not any("rouge" in key or "nearest" in key for key in reply.metrics)
    file = client_synthetic_file(tmp_path / "client-0", "fedpit", 2)
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    rows = [json.loads(line) for line in file.read_text().splitlines()]
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in rows] == KEPT
    assert [r[NEAREST] for r in rows][1] == 1.0


def test_report_section_reads_the_clients_files(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    write_round(folder / "clients" / "client-0", "fedpit", 1, KEPT, LOCAL)
    clients: list[dict[str, Any]] = [
        {"client": 0, "synthetic_kept": 2, **quality_metrics(KEPT)},
        {"client": 1, "synthetic_kept": 0, **quality_metrics([])},
        {"failed": "client 2 raised"},
    ]
    lines = generator_markdown("fedpit", [RoundLog(1, {}, 0.0, clients=clients)], folder)
    text = "\n".join(lines)
    assert "## What the generator wrote" in text
    assert "| 1 | 1.0000 |" in text  # kept: the mean over both reporting clients
    assert "2 examples: mean 0.500" in text and "never sent to the server" in text
    assert (folder / "plots" / "nearest_rouge_l.png").is_file()
    # A result among several finds the clients' disks in the experiment folder.
    assert "2 examples" in "\n".join(
        generator_markdown("fedpit", [RoundLog(1, {}, 0.0, clients=clients)], folder / "fedpit")
    )
    assert generator_markdown("fedpit", [RoundLog(1, {}, 0.0)], folder) == []
    # Round files that hold nothing (no client kept an example) and none at all differ.
    empty = [RoundLog(1, {}, 0.0, clients=clients[1:])]
    assert "the clients keep them" in "\n".join(generator_markdown("locit-sa", empty, folder))
    write_round(folder / "clients" / "client-1", "locit-sa", 1, [], LOCAL)
    assert "No client kept" in "\n".join(generator_markdown("locit-sa", empty, folder))


@pytest.mark.slow
def test_fedpit_run_reports_what_the_generator_wrote(tmp_path: Path) -> None:
    """Two real rounds on the Simulation Engine with real self-generation on the tiny model."""
    config = load_config(
        CONFIGS / "tiny.toml",
        [
            "experiment.algorithms=['fedpit']",
            "train.rounds=2",
            "eval.generate=false",
            "synthetic.per_round=4",
            "synthetic.truncated='keep'",
        ],
    )
    out = run_experiment(plan_experiment(config, tmp_path / "run"), Console(file=io.StringIO()))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for client in row["clients"]:
            assert set(QUALITY_KEYS) <= set(client)
            assert not any("rouge" in key or "nearest" in key for key in client)
    files = sorted((out / "clients").glob("client-*/synthetic/fedpit/round-*.jsonl"))
    assert len(files) == 2 * 3
    kept = sum(len(f.read_text().splitlines()) for f in files)
    summary = json.loads((out / "summary.json").read_text())
    assert kept == summary["synthetic"]["kept"]
    report = (out / "report.md").read_text()
    assert "## What the generator wrote" in report
    assert ("nearest_rouge_l.png" in report) == (kept > 0)
