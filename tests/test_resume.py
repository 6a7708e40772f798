"""Checkpoint and resume: an interrupted run, resumed, ends where an uninterrupted one does."""

from __future__ import annotations

import dataclasses
import io
import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from silotune import checkpoint
from silotune.algorithms import ALGORITHMS
from silotune.checkpoint import (
    RoundCheckpoint,
    load_client_state,
    load_result,
    load_round,
    save_client_state,
    save_result,
    save_round,
)
from silotune.config import Config, load_config
from silotune.errors import UserError
from silotune.jobs import AlgorithmResult, RoundLog
from silotune.repeats import resume
from silotune.run_folder import work_folder
from silotune.runner import plan_experiment, run_experiment

from .conftest import CONFIGS


def _log(round_: int) -> RoundLog:
    return RoundLog(
        round=round_,
        metrics={"eval_loss": 2.5 - round_ / 10},
        train_loss=3.0,
        bytes_up=10,
        wall_s=1.5,
        clients=[{"client": 0, "train_loss": 3.0}, {"failed": "node 4 dropped: no reply"}],
    )


def test_round_checkpoint_round_trips(tmp_path: Path) -> None:
    random.seed(3)
    state = checkpoint.python_random_state()
    ckpt = RoundCheckpoint(
        round=2,
        arrays={"a.weight": torch.arange(6.0).reshape(2, 3)},
        rounds=[_log(1), _log(2)],
        strategy_state={"m_t": {"a.weight": np.ones((2, 3), np.float32)}},
        samples=[{"instruction": "q", "prediction": "p"}],
        client_evals=[{"client": 1, "eval_loss": 2.0}],
        random_state=state,
    )
    save_round(tmp_path / "round", ckpt)
    back = load_round(tmp_path / "round")
    assert back is not None and back.round == 2
    assert torch.equal(back.arrays["a.weight"], ckpt.arrays["a.weight"])
    assert [r.to_json() for r in back.rounds] == [r.to_json() for r in ckpt.rounds]
    np.testing.assert_array_equal(back.strategy_state["m_t"]["a.weight"], np.ones((2, 3)))
    assert back.samples == ckpt.samples and back.client_evals == ckpt.client_evals
    expected = random.random()
    checkpoint.restore_python_random(back.random_state)
    assert random.random() == expected


def test_a_crash_while_saving_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "round"
    save_round(folder, RoundCheckpoint(round=1, arrays={"w": torch.zeros(2)}, rounds=[_log(1)]))

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError):
        save_round(folder, RoundCheckpoint(round=2, arrays={"w": torch.ones(2)}, rounds=[]))
    kept = load_round(folder)
    assert kept is not None and kept.round == 1
    # A crash between the two renames: only the .old twin is left, and it is still read.
    folder.rename(folder.with_name("round.old"))
    kept = load_round(folder)
    assert kept is not None and kept.round == 1


def test_algorithm_result_round_trips(tmp_path: Path) -> None:
    result = AlgorithmResult(
        rounds=[_log(1)],
        adapters={"global": {"w": torch.ones(3)}, "private": {"w": torch.zeros(3)}},
        per_client_final=[{"eval_loss": 1.0}],
        notes=["a note"],
        final_predictions=[["x", "y"]],
    )
    save_result(tmp_path / "result", result)
    back = load_result(tmp_path / "result")
    assert back is not None
    assert back.final == result.final and back.notes == result.notes
    assert torch.equal(back.adapters["private"]["w"], torch.zeros(3))
    assert back.final_predictions == [["x", "y"]] and back.synthetic is None


def test_client_state_is_taken_up_from_the_right_round(tmp_path: Path) -> None:
    for r in (1, 2, 3):
        save_client_state(tmp_path, r, {"private": {"w": torch.full((2,), float(r))}})
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        "round-2.safetensors",
        "round-3.safetensors",
    ], "only the last two rounds are kept"
    assert load_client_state(tmp_path, 2)["private"]["w"][0] == 2.0
    assert load_client_state(tmp_path, 9)["private"]["w"][0] == 3.0
    assert load_client_state(tmp_path, 1) == {}
    assert load_client_state(tmp_path / "nobody", 5) == {}


def test_resume_refuses_what_it_cannot_continue(tmp_path: Path) -> None:
    console = Console(file=io.StringIO())
    with pytest.raises(UserError, match="no interrupted run"):
        resume(tmp_path / "missing", console)
    (tmp_path / "done").mkdir()
    with pytest.raises(UserError, match="already finished"):
        resume(tmp_path / "done", console)
    (tmp_path / "early.incomplete").mkdir()
    with pytest.raises(UserError, match="before it started training"):
        resume(tmp_path / "early", console)


class _Crash(Exception):
    """Stands in for a killed server process."""


def _crash_after(monkeypatch: pytest.MonkeyPatch, algorithm: str, round_: int) -> None:
    from silotune.federated import server

    real = server.save_round

    def save_then_crash(folder: Path, ckpt: RoundCheckpoint) -> None:
        real(folder, ckpt)
        if folder.parent.name == algorithm and ckpt.round == round_:
            raise _Crash(f"killed after round {round_}")

    monkeypatch.setattr(server, "save_round", save_then_crash)


def _rows(folder: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _same_adapter(a: Path, b: Path) -> None:
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=0, atol=1e-6)


def _whole_and_resumed(
    config: Config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    crash: tuple[str, int],
    before_resume: Callable[[], None] = lambda: None,
) -> tuple[Path, Path]:
    """Run `config` uninterrupted, and again killed after round crash[1] of crash[0], resumed."""
    console = Console(file=io.StringIO())
    whole = run_experiment(plan_experiment(config, tmp_path / "whole"), console)
    _crash_after(monkeypatch, *crash)
    with pytest.raises(_Crash):
        run_experiment(plan_experiment(config, tmp_path / "cut"), console)
    work = work_folder(tmp_path / "cut")
    assert (work / "checkpoints" / crash[0] / "round").is_dir()
    assert not (tmp_path / "cut").exists(), "an interrupted run is never taken for a result"
    monkeypatch.undo()
    before_resume()
    resumed = resume(work, console)
    assert resumed == tmp_path / "cut"
    assert not (resumed / "checkpoints").exists(), "a finished run folder holds no checkpoints"
    return whole, resumed


def _fedit_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str
) -> tuple[Path, Path]:
    """Three rounds of FedIT on the tiny preset with `overrides`, whole and killed after round 2
    then resumed: both end on the same adapter."""
    config = load_config(
        CONFIGS / "tiny.toml",
        ["experiment.algorithms=['fedit']", "train.rounds=3", "eval.generate=false", *overrides],
    )
    whole, resumed = _whole_and_resumed(config, tmp_path, monkeypatch, ("fedit", 2))
    _same_adapter(
        whole / "adapters" / "global" / "adapter_model.safetensors",
        resumed / "adapters" / "global" / "adapter_model.safetensors",
    )
    return whole, resumed


@pytest.mark.slow
def test_interrupted_fedadam_run_resumes_to_the_same_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole, resumed = _fedit_resumes(tmp_path, monkeypatch, "federated.strategy='fedadam'")
    keys = ("round", "eval_loss", "train_loss", "bytes_up", "bytes_down")
    # Losses to 1e-6: the clients' training losses are averaged in the order their replies
    # arrive, which a simulation does not fix (differences up to 2e-8 relative were seen).
    want = [pytest.approx({k: r[k] for k in keys}, rel=1e-6) for r in _rows(whole)]
    assert [{k: r[k] for k in keys} for r in _rows(resumed)] == want
    assert json.loads((resumed / "summary.json").read_text())["rounds"] == 3


@pytest.mark.slow
def test_an_interrupted_compressed_mixed_rank_run_resumes_to_the_same_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLoRA over clients of ranks 2, 4 and 8, uploads coded to 4 bits: the codes and the
    projection are deterministic, so a resumed run ends on the uninterrupted one's adapter."""
    whole, resumed = _fedit_resumes(
        tmp_path,
        monkeypatch,
        "lora.r=8",
        "lora.client_ranks=[2, 4, 8]",
        "federated.aggregation='flora'",
        "federated.compression='nf4'",
    )
    rows = _rows(whole)
    assert [r["bytes_up"] for r in _rows(resumed)] == [r["bytes_up"] for r in rows]
    # Ranks 2 + 4 + 8 coded at ~0.14-0.2 of float32 (tiny tensors pad to whole blocks), while
    # every client receives the server's rank-8 adapter in float32.
    assert all(r["bytes_up"] < 0.2 * r["bytes_down"] for r in rows)


@pytest.mark.slow
def test_an_interrupted_fedex_run_resumes_with_its_correction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FedEx's frozen correction is part of the server's state: the checkpoint keeps it, and
    the resumed run ends on the same exact adapter (of the summed rank)."""
    whole, resumed = _fedit_resumes(tmp_path, monkeypatch, "federated.aggregation='fedex'")
    rows = _rows(whole)
    assert all(r["product_gap"] < 1e-6 for r in rows)
    assert [r["product_gap"] for r in _rows(resumed)][-1] < 1e-6


@pytest.mark.slow
def test_resumed_experiment_skips_finished_algorithms_and_restores_client_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(
        CONFIGS / "tiny.toml",
        [
            "experiment.algorithms=['cenit', 'fedpit']",
            "train.rounds=2",
            "eval.generate=false",
            "synthetic.per_round=2",
            "synthetic.instruction_max_new_tokens=8",
            "synthetic.response_max_new_tokens=8",
            "synthetic.min_instruction_words=0",
            "synthetic.min_response_words=0",
        ],
    )

    def cenit_must_not_run_again() -> None:
        cenit = ALGORITHMS.get("cenit")

        def must_not_run(job: object) -> AlgorithmResult:
            raise AssertionError("cenit finished before the interruption; it must not run again")

        monkeypatch.setitem(
            ALGORITHMS._items, "cenit", dataclasses.replace(cenit, run=must_not_run)
        )

    whole, resumed = _whole_and_resumed(
        config, tmp_path, monkeypatch, ("fedpit", 1), cenit_must_not_run_again
    )
    for name in ("cenit", "fedpit"):
        _same_adapter(
            whole / name / "adapters" / "global" / "adapter_model.safetensors",
            resumed / name / "adapters" / "global" / "adapter_model.safetensors",
        )
    # Round 2 of the resumed run started from the private adapters the clients kept after round 1.
    for client in range(3):
        private = Path("clients", f"client-{client}", "adapters", "private")
        _same_adapter(
            whole / private / "adapter_model.safetensors",
            resumed / private / "adapter_model.safetensors",
        )
    comparison = json.loads((resumed / "comparison.json").read_text())
    assert set(comparison["runs"]) == {"cenit", "fedpit"}
