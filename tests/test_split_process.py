"""How a split run starts its processes: typed arguments, and no Flower in them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from silotune.split.process import ClientArgs, ServerArgs, command, parse

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
