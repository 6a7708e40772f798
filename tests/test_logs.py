"""A quiet start: third-party log records go to the run's log file, not the terminal."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from silotune import logs

from .conftest import CONFIGS


@pytest.fixture
def routed(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logs.install()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_the_terminal_shows_only_what_a_user_can_act_on(
    routed: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logging.getLogger("somelib").warning("kernel notice before the run folder exists")
    logging.getLogger("silotune.split.server").info("round 1 done")
    logging.getLogger("somelib").error("the disk is on fire")
    err = capsys.readouterr().err
    assert "round 1 done" in err and "the disk is on fire" in err and "(somelib)" in err
    assert "kernel notice" not in err
    with logs.to_file(tmp_path) as path:
        logging.getLogger("otherlib").warning("during the run")
        import warnings

        with warnings.catch_warnings():  # whatever filters earlier tests or libraries left
            warnings.simplefilter("always")
            warnings.warn("a library's UserWarning", UserWarning, stacklevel=1)
    logging.getLogger("otherlib").warning("after the run")
    kept = path.read_text()
    assert path == tmp_path / logs.LOG_FILE
    for line in ("kernel notice", "round 1 done", "disk is on fire", "during the run"):
        assert line in kept
    assert "a library's UserWarning" in kept and "after the run" not in kept
    assert capsys.readouterr().err == ""


def test_help_and_a_run_print_nothing_on_stderr_and_a_run_shows_progress(tmp_path: Path) -> None:
    def silotune(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "silotune.cli", *args]
        return subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)

    helped = silotune("--help")
    assert helped.returncode == 0 and helped.stderr == ""
    out = tmp_path / "run"
    tiny = str(CONFIGS / "tiny.toml")
    ran = silotune("run", tiny, "--out", str(out), "--set", "experiment.algorithms=['fedit']")
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr == ""
    # Not a terminal: one line per event from the clients in Flower's simulation workers.
    assert "client 0: training" in ran.stdout and "runner: held-out loss" in ran.stdout
    assert not (out / "progress").exists()
    # Flower warns about its own settings on every simulation: kept, out of sight.
    assert "flwr" in (out / logs.LOG_FILE).read_text()
