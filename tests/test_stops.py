"""Stopping and rerunning: no process or key folder of ours outlives the command that started it.

SIGTERM (what docker, systemd and `timeout` send) saves what SIGINT saves and stops every child;
a parent killed without a signal still takes its children with it; an interrupted run's folder is
never deleted by a rerun, and the interrupted split run resumes to the adapters of an
uninterrupted one.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from rich.console import Console
from safetensors.torch import load_file

from silotune.cli import main
from silotune.config import load_config
from silotune.deploy.local import deploy_local
from silotune.errors import UserError
from silotune.procs import Supervisor

from .conftest import CONFIGS
from .test_split_resume import assert_same_split_run

TINY = str(CONFIGS / "tiny.toml")
# One client: with several, a serial server's step order follows their timing, so two runs never
# interrupted differ as well. Enough rounds that the stop lands before the last one.
SPLIT = [
    *("--set", "experiment.algorithms=['split']", "--set", "model.tiny_layers=3"),
    *("--set", "train.rounds=6", "--set", "eval.generate=false", "--set", "partition.clients=1"),
]
# A child that starts a grandchild which ignores SIGTERM (as a stuck helper would).
TREE = (
    "import signal, subprocess, sys, time\n"
    "grand = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); '\n"
    "grand += 'time.sleep(600)'\n"
    "subprocess.Popen([sys.executable, '-c', grand])\n"
    "time.sleep(600)\n"
)


def _wait(what: Callable[[], object], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            pytest.fail(message)
        time.sleep(0.2)


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still running (a zombie is dead, only not yet reaped)."""
    running = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                running.append(p)
        except psutil.NoSuchProcess:
            pass
    return running


def _tree(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _env(tmp: Path) -> dict[str, str]:
    """A private temp folder, so key folders left behind can be counted."""
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}


def test_stopping_the_supervisor_stops_the_whole_tree_and_deletes_its_keys(
    tmp_path: Path,
) -> None:
    with Supervisor(grace_s=2) as procs:
        keys = procs.temp_dir("silotune-test-")
        top = procs.start("tree", [sys.executable, "-c", TREE], tmp_path / "tree.log")
        _wait(lambda: len(_tree(top.pid)) == 2, 30, "the child did not start its grandchild")
        tree = _tree(top.pid)
    # SIGKILLed when the grace period ended; the kernel takes a moment to tear it down.
    _wait(lambda: not _alive(tree), 2, "the grandchild ignoring SIGTERM outlived the grace period")
    assert not keys.exists()


def test_children_stop_when_their_parent_is_killed_without_a_signal(tmp_path: Path) -> None:
    parent_code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from silotune.procs import Supervisor\n"
        "procs = Supervisor()\n"
        "print(procs.temp_dir('silotune-test-'), flush=True)\n"
        f"procs.start('tree', [sys.executable, '-c', {TREE!r}], Path({str(tmp_path)!r}) / 'log')\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, env=_env(tmp_path / "tmp")
    )
    assert parent.stdout is not None
    keys = Path(parent.stdout.readline().decode().strip())
    assert keys.is_dir()
    _wait(lambda: len(_tree(parent.pid)) == 3, 30, "the tree did not start")
    tree = _tree(parent.pid)
    parent.kill()
    parent.wait()
    _wait(lambda: not _alive(tree), 10, f"alive 10 s after the parent died: {_alive(tree)}")
    assert not keys.exists(), "the orphaned watchdog deletes the key folder"


def test_a_rerun_over_an_interrupted_run_refuses_and_keeps_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    work = tmp_path / "run.incomplete"
    (work / "checkpoints").mkdir(parents=True)
    (work / "checkpoints" / "base.json").write_text("{}")
    assert main(["run", TINY, "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"silotune run --resume {work}" in err and f"rm -r {work}" in err
    assert (work / "checkpoints" / "base.json").is_file()
    config = load_config(Path(TINY), ["experiment.algorithms=['fedit']"])
    with pytest.raises(UserError, match="silotune run --resume"):
        deploy_local(config, out, Console(file=io.StringIO()))
    assert (work / "checkpoints" / "base.json").is_file()


def test_split_server_saves_its_adapter_on_sigterm(tmp_path: Path) -> None:
    out = tmp_path / "server"
    argv = [
        *(sys.executable, "-m", "silotune.cli", "split-server", TINY),
        *("--set", "model.tiny_layers=3", "--listen", "127.0.0.1:0"),
        *("--clients", "1", "--out", str(out), "--insecure"),
    ]
    log = tmp_path / "server.log"
    with log.open("wb") as fh:
        server = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
    _wait(lambda: (out / "port").is_file() or server.poll() is not None, 120, "no port")
    assert server.poll() is None, log.read_text()
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 128 + signal.SIGTERM
    assert load_file(str(out / "middle-adapter.safetensors"))
    assert json.loads((out / "server.json").read_text())["steps"] == 0
    assert "--resume" in log.read_text()


def _run(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "silotune.cli", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _terminated(proc: subprocess.Popen[bytes], log: Path, tmp: Path, keys: str) -> None:
    """SIGTERM `proc`: exit 143, and 10 s later none of its processes or key folders remain."""
    tree = _tree(proc.pid)
    assert tree, "children were running"
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, log.read_text()
    while _alive(tree) and time.monotonic() < start + 10:
        time.sleep(0.2)
    assert not _alive(tree), [(p.pid, p.cmdline()) for p in _alive(tree)]
    assert not list(tmp.glob(keys)), "no key folder is left in the temp folder"


@pytest.mark.slow
def test_sigterm_stops_a_split_run_and_resume_ends_like_an_uninterrupted_one(
    tmp_path: Path,
) -> None:
    env = _env(tmp_path / "tmp")
    whole = _run(["run", TINY, *SPLIT, "--out", str(tmp_path / "whole")], tmp_path / "w.log", env)
    assert whole.wait(timeout=900) == 0, (tmp_path / "w.log").read_text()

    out, log = tmp_path / "run", tmp_path / "run.log"
    work = tmp_path / "run.incomplete"
    run = _run(["run", TINY, *SPLIT, "--out", str(out)], log, env)
    progress = work / "split" / "client-0" / "rounds.jsonl"
    _wait(
        lambda: run.poll() is not None or (progress.is_file() and progress.read_text().strip()),
        600,
        "round 1 did not finish",
    )
    _terminated(run, log, tmp_path / "tmp", "silotune-split-pki-*")
    assert f"silotune run --resume {work}" in " ".join(log.read_text().split())
    assert (work / "split" / "server" / "middle-adapter.safetensors").is_file()

    resumed = _run(["run", "--resume", str(work)], tmp_path / "resume.log", env)
    assert resumed.wait(timeout=900) == 0, (tmp_path / "resume.log").read_text()
    # It went on from the checkpoints (server and client), not from round 1.
    server_log = (out / "split" / "server.log").read_text()
    assert re.search(r"resumed after round [1-5] ", server_log), server_log
    assert_same_split_run(tmp_path / "whole" / "split", out / "split", "client-0")
    assert not list((tmp_path / "tmp").glob("silotune-*"))


@pytest.mark.slow
def test_sigterm_stops_a_local_deployment(tmp_path: Path) -> None:
    env = _env(tmp_path / "tmp")
    out, log = tmp_path / "dep", tmp_path / "dep.log"
    args = ["deploy", "local", TINY, "--set", "experiment.algorithms=['fedit']", "--out", str(out)]
    run = _run([*args, "--set", "eval.generate=false"], log, env)
    started = tmp_path / "dep.incomplete" / "config.json"  # the ServerApp's first write
    _wait(lambda: run.poll() is not None or started.is_file(), 600, "the ServerApp did not start")
    _terminated(run, log, tmp_path / "tmp", "silotune-federation-*")
    assert f"remove {tmp_path / 'dep.incomplete'} (rm -r)" in " ".join(log.read_text().split())
