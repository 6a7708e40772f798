"""The split processes a run starts on this machine: `python -m silotune.split.process ARGS`.

The launcher describes each process with typed arguments (`ServerArgs`, `ClientArgs`), passed
as one JSON argument; the process reads the run's checked config.json and runs its role. People
start split processes on their own machines with `silotune split-server` / `split-client`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from silotune.logs import install as route_logs
from silotune.procs import run_command
from silotune.progress import PROGRESS_DIR, reporting

_MODULE = "silotune.split.process"


@dataclass(frozen=True)
class ServerArgs:
    """A split server: serves `clients` clients on `listen`, writes into `out`."""

    config: Path  # the run's config.json
    listen: str  # host:port (port 0: any free port, written to OUT/port)
    clients: int
    out: Path
    certs: Path | None  # the run's PKI (mutual TLS); None: no TLS
    resume: bool = False  # go on from the checkpoint in `out`


@dataclass(frozen=True)
class ClientArgs:
    """A split client `client` of the server at `server`, on its own data, writing into `out`."""

    config: Path
    client: str
    server: str  # host:port
    data: Path
    eval_file: Path
    out: Path
    certs: Path | None
    resume: bool = False  # go on from the checkpoint in `out` (the server resumes too)


def command(args: ServerArgs | ClientArgs) -> list[str]:
    """The command line that starts the process `args` describes."""
    role = "server" if isinstance(args, ServerArgs) else "client"
    fields = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()}
    return [sys.executable, "-m", _MODULE, role, json.dumps(fields)]


# How long libgomp's idle threads spin before they sleep (its default: 300,000). Server and
# client take turns on the same cores: a process waiting on the other should not keep a core
# busy. 30,000 makes split decoding 10 % faster and leaves training steps as they were; shorter
# spins slow every parallel region (bench/README.md, split_generate.py).
_GOMP_SPINCOUNT = "30000"


def environment() -> dict[str, str]:
    """The environment for the split processes a run starts: this one's, with logs written
    line by line (they show progress) and libgomp's spin shortened unless the user set it."""
    return {"GOMP_SPINCOUNT": _GOMP_SPINCOUNT, **os.environ, "PYTHONUNBUFFERED": "1"}


def shorten_spin() -> bool:
    """Shorten libgomp's spin in this process's environment unless the user set it; True if it
    did. libgomp reads it once, when torch loads: call this before anything imports torch (the
    split commands do; a benchmark that already imported it re-executes itself)."""
    if "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = _GOMP_SPINCOUNT
    return True


def parse(argv: list[str]) -> ServerArgs | ClientArgs:
    """Inverse of `command` (without the interpreter and module)."""
    role, payload = argv
    data: dict[str, Any] = json.loads(payload)
    paths = {"config", "out", "certs", "data", "eval_file"}
    values: dict[str, Any] = {
        k: Path(v) if k in paths and v is not None else v for k, v in data.items()
    }
    return ServerArgs(**values) if role == "server" else ClientArgs(**values)


def _run(args: ServerArgs | ClientArgs) -> int:
    from silotune.config import load_config
    from silotune.split.roles import run_client, run_server

    config = load_config(args.config, algorithm_checks=False)  # runs none of them
    if isinstance(args, ServerArgs):
        run_server(config, args.listen, args.certs, args.clients, args.out, args.resume)
    else:
        # The run's progress display shows this client's steps (config.json is in the run folder).
        with reporting(args.config.parent / PROGRESS_DIR, f"split {args.client}"):
            run_client(
                config,
                args.client,
                args.server,
                args.certs,
                args.data,
                args.eval_file,
                args.out,
                args.resume,
            )
    return 0


def main(argv: list[str]) -> int:
    """Run the process `argv` (from `command`) describes; its exit code."""
    args = parse(argv)
    route_logs(flower=False)
    return run_command(lambda: _run(args), "free space, then resume the run with --resume")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
