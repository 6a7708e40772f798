"""The command line: help, and one clear message with exit code 2 for every user mistake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from silotune.cli import main

from .conftest import CONFIGS

TINY = str(CONFIGS / "tiny.toml")


def test_help_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "run" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for flag in ("--set", "--out", "SECTION.KEY=VALUE"):
        assert flag in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.roundz=2"], "unknown key 'roundz' in [train]; did you mean 'rounds'?"),
        (["--set", "train.rounds=two"], "train.rounds must be an integer"),
        (["--set", "data.path=missing/file.jsonl"], "data file not found: missing/file.jsonl"),
        (["--set", "data.output_field=reply"], "data.output_field names column 'reply'"),
        (["--set", "partition.clients=500"], "lower data.eval_size or partition.clients"),
        (["--set", "experiment.algorithms=['fedavg']"], "experiment.algorithms[0] must be one of"),
    ],
)
def test_user_errors_exit_2_without_traceback(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = main(["run", TINY, "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in " ".join(err.split())
    assert "Traceback" not in err
    assert not out.exists() and not out.with_name("run.incomplete").exists()


def test_unloadable_model_is_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub.constants

    # Offline mode is read at import; flip the constant so the hub is not even tried.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "run"
    code = main(["run", TINY, "--out", str(out), "--set", "model.name=no-such-org/no-such-model"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert "cannot load model 'no-such-org/no-such-model'" in err and "set model.name" in err
    assert not out.exists() and not out.with_name("run.incomplete").exists()


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path: Path) -> None:
    """The installed entry point, as a user runs it: message on stderr, code 2, no traceback."""
    bad = tmp_path / "bad.toml"
    bad.write_text(json.dumps("not toml"))
    proc = subprocess.run(
        [sys.executable, "-m", "silotune.cli", "run", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "is not valid TOML" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run"], "give a config file (e.g. configs/demo.toml) or --resume DIR"),
        (["run", TINY, "--resume", "runs/x"], "give only --resume DIR"),
        (["run", "--resume", "nowhere/run"], "no interrupted run at nowhere/run"),
        (["run", "--set", "federated.quorum=4", TINY], "federated.quorum = 4 but only 3 client"),
        (["deploy", "local", TINY], "a deployed run takes one federated algorithm"),
    ],
)
def test_resume_and_deploy_mistakes_are_named(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    assert message in " ".join(capsys.readouterr().err.split())
