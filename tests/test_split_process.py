"""How a split run starts its processes: typed arguments, and no Flower in them."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from silotune.algorithms.split import resumable_round
from silotune.run_folder import RunFolder
from silotune.split.process import ClientArgs, ServerArgs, command, parse
from silotune.split.trainers.state import save_training_state, saved_round

from .conftest import CONFIGS


def test_typed_arguments_survive_the_command_line(tmp_path: Path) -> None:
    server = ServerArgs(tmp_path / "config.json", "127.0.0.1:0", 3, tmp_path / "server", None)
    client = ClientArgs(
        config=tmp_path / "config.json",
        client="client-1",
        server="localhost:5000",
        data=tmp_path / "client-1.jsonl",
        eval_file=tmp_path / "eval.jsonl",
        out=tmp_path / "client-1",
        certs=tmp_path / "pki",
        resume=True,
    )
    for args in (server, client):
        argv = command(args)
        assert argv[:3] == [sys.executable, "-m", "silotune.split.process"]
        assert parse(argv[3:]) == args


def test_a_split_process_loads_no_flower() -> None:
    code = (
        "import sys\n"
        "from silotune.config import load_config\n"
        "import silotune.split.process, silotune.split.roles\n"
        f"load_config({str(CONFIGS / 'tiny.toml')!r}, algorithm_checks=False)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'ray')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_split_processes_get_the_shorter_spin_unless_the_user_set_one() -> None:
    """libgomp reads GOMP_SPINCOUNT once, when torch loads: the split commands set it first
    thing, which works only while the CLI's modules leave torch unloaded."""
    code = (
        "import os, sys\n"
        "import silotune.cli\n"
        "from silotune.split.process import environment, shorten_spin\n"
        "assert 'torch' not in sys.modules\n"
        "print(os.environ.get('GOMP_SPINCOUNT'), environment()['GOMP_SPINCOUNT'], end=' ')\n"
        "print(shorten_spin(), os.environ['GOMP_SPINCOUNT'], shorten_spin())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    unset = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert unset.returncode == 0, unset.stderr[-2000:]
    assert unset.stdout.split() == ["None", "30000", "True", "30000", "False"]
    own = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "GOMP_SPINCOUNT": "7"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert own.stdout.split() == ["7", "7", "False", "7", "False"]


def test_a_resumed_run_goes_on_only_from_a_round_server_and_clients_all_saved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = RunFolder(tmp_path)
    clients = ["client-0", "client-1"]
    assert resumable_round(run, clients) is None  # nothing saved: from the start

    def saved(name: str, rnd: int) -> None:
        outputs = run.split_outputs(name)
        outputs.root.mkdir(parents=True, exist_ok=True)
        if name == "server":
            state = {"round": rnd, "steps": 3 * rnd, "rng": torch.get_rng_state(), "modules": {}}
            save_training_state(state, outputs.checkpoint)
        else:
            outputs.checkpoint.write_bytes(b"adapters")
            outputs.checkpoint_round.write_text(json.dumps({"round": rnd}))

    saved("server", 2)
    saved("client-0", 2)
    assert resumable_round(run, clients) is None  # client-1 saved nothing
    saved("client-1", 1)  # stopped before its round-2 evaluation ended
    with caplog.at_level(logging.WARNING):
        assert resumable_round(run, clients) is None
    assert "different rounds [1, 2]; restarting from round 1" in caplog.text
    saved("client-1", 2)
    assert resumable_round(run, clients) == 2
    # The server saved round 3 at its barrier; both clients stopped before saving theirs.
    saved("server", 3)
    assert resumable_round(run, clients) is None  # no previous checkpoint kept: restart
    server = run.split_outputs("server")
    saved("server", 2)
    server.checkpoint.replace(server.previous_checkpoint)
    saved("server", 3)
    assert resumable_round(run, clients) == 2
    assert saved_round(server.checkpoint) == 2 and not server.previous_checkpoint.exists()
