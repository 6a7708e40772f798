"""`silotune deploy local`: a whole Flower federation on this machine, run, then torn down.

One SuperLink and one SuperNode per client, each its own OS process talking over loopback:
TLS on every connection (a throwaway CA), SuperNode authentication on (each SuperNode's EC key
registered with the SuperLink before it starts), runtime dependency installation off (the
processes share this environment). Each SuperNode is told only its own data file. The experiment
is started with `flwr run` and its results land where `silotune run` puts them. Keys and
certificates live in a temporary folder that is deleted afterwards; the processes' logs are kept
in OUT/deploy-logs/.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from rich.console import Console

from silotune.algorithms import ALGORITHMS
from silotune.config import Config
from silotune.data.load import load_records
from silotune.data.partition import split_dataset
from silotune.data.private import write_partitions
from silotune.errors import ConfigError, UserError
from silotune.procs import Supervisor
from silotune.run_folder import RunFolder, eval_file, partition_file, refuse_leftover, work_folder
from silotune.security.tls import create_dev_pki

_CONNECTION = "silotune-local"


class DeployError(UserError):
    """A process of the local federation failed; the message says which and where its log is."""


@dataclass
class _Federation:
    root: Path  # temporary: certificates, keys, Flower homes
    logs: Path
    env: dict[str, str]
    port: int
    procs: Supervisor
    killed: set[str] = field(default_factory=set)  # stopped on purpose (fault injection)

    @property
    def processes(self) -> list[tuple[str, subprocess.Popen[bytes]]]:
        return list(self.procs.processes.items())

    def start(self, name: str, args: list[str], home: str) -> None:
        env = {**self.env, "FLWR_HOME": str(self.root / home)}
        self.procs.start(name, args, self.logs / f"{name}.log", env)

    def flwr(self, *args: str, timeout: float = 120) -> dict[str, Any]:
        """Run the `flwr` CLI against the local SuperLink; its JSON answer."""
        env = {**self.env, "FLWR_HOME": str(self.root / "cli")}
        done = subprocess.run(
            [_tool("flwr"), *args, "--format", "json"],
            capture_output=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        try:
            answer: dict[str, Any] = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise DeployError(
                f"`flwr {args[0]}` failed: {(done.stdout + done.stderr).decode()[-800:]}"
            ) from None
        if not answer.get("success", False):
            raise DeployError(f"`flwr {' '.join(args[:2])}` failed: {answer}")
        return answer

    def check_alive(self) -> None:
        for name, proc in self.processes:
            if proc.poll() is not None and name not in self.killed:
                raise DeployError(
                    f"{name} exited with code {proc.returncode}; see {self.logs / name}.log"
                )

    def kill(self, name: str) -> None:
        """SIGKILL process `name` and everything it started, as a crash would."""
        self.killed.add(name)
        self.procs.kill(name)


def check_deployable(config: Config) -> str:
    """The one federated algorithm a deployed run can take, or a ConfigError saying why not."""
    algorithms = config.experiment.algorithms
    deployable = [name for name in ALGORITHMS if ALGORITHMS.get(name).deployable]
    if len(algorithms) != 1 or algorithms[0] not in deployable:
        raise ConfigError(
            f"a deployed run takes one federated algorithm ({' or '.join(deployable)}); got "
            f"experiment.algorithms = {list(algorithms)}; set e.g. "
            "--set experiment.algorithms='[\"fedit\"]'"
        )
    if config.defence.dp == "client-fixed" or config.defence.secagg:
        raise ConfigError(
            "client-side DP clipping and SecAgg+ need client mods, which the deployed app does "
            "not install yet; use defence.dp = 'server-fixed' or run in simulation"
        )
    if config.sweep.key:
        raise ConfigError("a deployed run takes no [sweep]; deploy one value at a time")
    return algorithms[0]


def deploy_local(
    config: Config,
    out: Path,
    console: Console,
    timeout_s: float = 3600,
    while_running: Callable[[_Federation], None] = lambda _: None,
) -> Path:
    """Start a local federation, run `config` on it with `flwr run`, tear it down; OUT.

    `while_running(federation)` is called once the run has started (fault-injection tests)."""
    check_deployable(config)
    if out.exists():
        raise ConfigError(f"output folder {out} already exists; pass another --out or remove it")
    refuse_leftover(out)
    work = RunFolder(work_folder(out))
    loaded = load_records(config.data)
    split = split_dataset(loaded.dataset, config.data, config.partition, config.experiment.seed)
    parts = work.partitions
    write_partitions(parts, split)
    logs = work.deploy_logs
    logs.mkdir(exist_ok=True)
    with _federation(logs, len(split.clients)) as fed:
        console.print(f"SuperLink on 127.0.0.1:{fed.port} (TLS, SuperNode authentication)")
        for i in range(len(split.clients)):
            _start_supernode(fed, i, parts, work.clients)
        _wait_online(fed, len(split.clients))
        console.print(f"{len(split.clients)} SuperNodes online; flwr run ...")
        run_id = _flwr_run(fed, config, out.resolve(), work.eval_file.resolve())
        while_running(fed)
        status = _wait_finished(fed, run_id, timeout_s, console)
    # The ServerApp wrote its results into the same folder and renamed it to OUT.
    if status["status"] != "finished:completed" or not out.is_dir():
        raise DeployError(
            f"run {run_id} ended {status['status']}: {status.get('status-details', '')}; "
            f"logs in {logs}"
        )
    return out


@contextmanager
def _federation(logs: Path, clients: int) -> Iterator[_Federation]:
    bin_dir = str(Path(sys.executable).parent)  # Flower starts its helpers by name
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    # Stopping the supervisor stops every process (SuperNodes first) and deletes the keys.
    with Supervisor() as procs:
        root = procs.temp_dir("silotune-federation-")
        fed = _Federation(root=root, logs=logs, env=env, port=_free_port(), procs=procs)
        create_dev_pki(root / "pki", [f"node-{i}" for i in range(clients)])
        (root / "cli").mkdir()
        (root / "cli" / "config.toml").write_text(
            f'[superlink]\ndefault = "{_CONNECTION}"\n\n[superlink.{_CONNECTION}]\n'
            f'address = "127.0.0.1:{fed.port}"\n'
            f"root-certificates = {json.dumps(str(root / 'pki' / 'ca.pem'))}\n",
            encoding="utf-8",
        )
        pki = root / "pki"
        fed.start(
            "superlink",
            [
                _tool("flower-superlink"),
                "--ssl-ca-certfile", str(pki / "ca.pem"),
                "--ssl-certfile", str(pki / "server.pem"),
                "--ssl-keyfile", str(pki / "server.key"),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1",
                "--port", str(fed.port),
            ],
            "superlink",
        )  # fmt: skip
        _wait_healthy(fed)
        yield fed


def _start_supernode(fed: _Federation, i: int, parts: Path, clients_dir: Path) -> None:
    key = fed.root / "keys" / f"node-{i}"
    write_supernode_key(key)
    fed.flwr("supernode", "register", str(key.with_suffix(".pub")), _CONNECTION)
    node_config = fed.root / f"node-{i}.toml"
    values = {
        "partition-id": i,
        "data-path": str(partition_file(parts, i).resolve()),
        "eval-path": str(eval_file(parts).resolve()),
        "state-dir": str(clients_dir.resolve()),
    }
    node_config.write_text(_toml(values), encoding="utf-8")
    fed.start(
        f"supernode-{i}",
        [
            _tool("flower-supernode"),
            "--superlink", f"127.0.0.1:{fed.port}",
            "--root-certificates", str(fed.root / "pki" / "ca.pem"),
            "--auth-supernode-private-key", str(key),
            "--host", "127.0.0.1",
            "--port", str(_free_port()),
            "--node-config", str(node_config),
        ],
        f"node-{i}",
    )  # fmt: skip


def write_supernode_key(path: Path) -> None:
    """An EC P-384 key pair in OpenSSH format (what Flower's SuperNode authentication takes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    path.write_bytes(private)
    path.chmod(0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path.with_suffix(".pub").write_bytes(public + b"\n")


def _flwr_run(fed: _Federation, config: Config, out: Path, eval_path: Path) -> int:
    app = fed.root / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(_APP_PYPROJECT, encoding="utf-8")
    run_config = fed.root / "run-config.toml"
    values = {
        "silotune-config": json.dumps(config.to_dict()),
        "out": str(out),
        "eval-path": str(eval_path),
    }
    run_config.write_text(_toml(values), encoding="utf-8")
    answer = fed.flwr("run", str(app), _CONNECTION, "--run-config", str(run_config))
    return int(answer["run-id"])


def _wait_healthy(fed: _Federation, timeout_s: float = 60) -> None:
    context = ssl.create_default_context(cafile=str(fed.root / "pki" / "ca.pem"))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fed.check_alive()
        try:
            url = f"https://127.0.0.1:{fed.port}/health"
            with urllib.request.urlopen(url, context=context, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise DeployError(f"the SuperLink did not come up in {timeout_s:.0f} s; see {fed.logs}")


def _wait_online(fed: _Federation, clients: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fed.check_alive()
        nodes = fed.flwr("supernode", "ls", _CONNECTION).get("nodes", [])
        if sum(n.get("status") == "online" for n in nodes) >= clients:
            return
        time.sleep(1)
    raise DeployError(f"not every SuperNode came online in {timeout_s:.0f} s; see {fed.logs}")


def _wait_finished(
    fed: _Federation, run_id: int, timeout_s: float, console: Console
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fed.check_alive()
        (run,) = fed.flwr("ls", _CONNECTION, "--run-id", str(run_id))["runs"]
        if str(run["status"]).startswith("finished"):
            return dict(run)
        time.sleep(5)
    raise DeployError(f"run {run_id} did not finish in {timeout_s:.0f} s; logs in {fed.logs}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise DeployError(f"{name} is not installed next to {sys.executable}; reinstall flwr")
    return str(path)


def _toml(values: dict[str, Any]) -> str:
    """Flat key = value TOML (JSON string and number literals are valid TOML)."""
    return "".join(f'"{k}" = {json.dumps(v)}\n' for k, v in values.items())


_APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "silotune-federation"
version = "1.0.0"
description = "silotune's federated algorithms as a Flower app"
license = "Apache-2.0"
dependencies = ["silotune"]

[tool.flwr.app]
publisher = "silotune"

[tool.flwr.app.components]
serverapp = "silotune.deploy.apps:server_app"
clientapp = "silotune.deploy.apps:client_app"

[tool.flwr.app.config]
silotune-config = "{}"
out = "runs/deployed"
eval-path = "eval.jsonl"
"""
