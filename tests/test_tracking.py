"""Experiment tracking: a tiny run's figures read back through TensorBoard's event reader,
MLflow's client and W&B's own record format; a resumed run goes on in the same tracker runs."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from silotune.config import load_config
from silotune.errors import ConfigError
from silotune.repeats import resume
from silotune.run_folder import work_folder
from silotune.runner import plan_experiment, run_experiment
from silotune.tracking import check_installed, run_name

from .conftest import CONFIGS
from .test_resume import _Crash, _crash_after

pytest.importorskip("mlflow")
pytest.importorskip("wandb")
pytest.importorskip("tensorboard")


def _config(tmp_path: Path, *extra: str) -> Any:
    return load_config(
        CONFIGS / "tiny.toml",
        [
            "experiment.algorithms=['fedit', 'locit']",
            "train.rounds=2",
            "eval.generate=false",
            "tracking.backends=['tensorboard', 'mlflow', 'wandb']",
            f"tracking.mlflow_uri='sqlite:///{tmp_path}/mlflow.db'",
            *extra,
        ],
    )


def _losses(folder: Path) -> list[float]:
    rows = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(row)["eval_loss"] for row in rows]


def _tensorboard(folder: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def _wandb_history(run_file: Path) -> list[dict[str, Any]]:
    """The history rows of an offline W&B run: its .wandb file is a LevelDB-style log of W&B's
    own protobuf records (wandb.proto)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                )
    return rows


def test_a_tracked_run_reads_back_through_each_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # MLflow keeps artefacts beside its store, as it does by default
    out = tmp_path / "run"
    run_experiment(plan_experiment(_config(tmp_path), out), Console(file=io.StringIO()))
    ids = json.loads((out / "tracking.json").read_text())
    for algorithm in ("fedit", "locit"):
        want = _losses(out / algorithm)
        board = _tensorboard(out / "tensorboard" / algorithm, "eval_loss")
        assert board == pytest.approx({1: want[0], 2: want[1]})
        assert set(_tensorboard(out / "tensorboard" / algorithm, "client_0/train_loss")) == {1, 2}

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run/fedit", "run/locit"]
    fedit = client.get_run(ids["mlflow"]["fedit"])
    assert fedit.info.status == "FINISHED" and fedit.data.params["train.rounds"] == "2"
    history = client.get_metric_history(fedit.info.run_id, "eval_loss")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx(_losses(out / "fedit"))
    assert "report.md" in [a.path for a in client.list_artifacts(fedit.info.run_id)]

    (offline,) = (out / "wandb").glob(f"offline-run-*-{ids['wandb']['locit']}")
    history = _wandb_history(offline / f"run-{ids['wandb']['locit']}.wandb")
    losses = [row["eval_loss"] for row in history if "eval_loss" in row]
    assert losses == pytest.approx(_losses(out / "locit"))
    assert (offline / "files" / "report.md").is_file()


@pytest.mark.slow
def test_a_resumed_run_goes_on_in_the_same_tracker_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path, "experiment.algorithms=['fedit']", "train.rounds=3")
    console = Console(file=io.StringIO())
    # Killed after round 2's checkpoint, before its log reached the trackers.
    _crash_after(monkeypatch, "fedit", 2)
    with pytest.raises(_Crash):
        run_experiment(plan_experiment(config, tmp_path / "cut"), console)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    work = work_folder(tmp_path / "cut")
    cut_ids = json.loads((work / "tracking.json").read_text())
    assert cut_ids["logged"] == {"fedit": [1]}
    out = resume(work, console)
    ids = json.loads((out / "tracking.json").read_text())
    assert {k: v for k, v in ids.items() if k != "logged"} == {
        k: v for k, v in cut_ids.items() if k != "logged"
    }
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run_id = cut_ids["mlflow"]["fedit"]
    steps = [m.step for m in client.get_metric_history(run_id, "eval_loss")]
    assert steps == [1, 2, 3] and client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    board = _tensorboard(out / "tensorboard" / "fedit", "eval_loss")
    assert board == pytest.approx(dict(enumerate(_losses(out), start=1)))


def test_a_missing_tracker_library_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    config = load_config(CONFIGS / "tiny.toml", ["tracking.backends=['wandb']"])
    with pytest.raises(ConfigError, match=r"pip install 'silotune\[tracking\]'"):
        check_installed(config)


def test_run_names_keep_the_sweep_and_seed() -> None:
    assert run_name(Path("runs/study.incomplete/alpha=0.1.incomplete/seed=0")) == (
        "study/alpha=0.1/seed=0"
    )
    assert run_name(Path("runs/demo")) == "demo"
