"""Deployment on Flower's Deployment Engine: separate processes, TLS, SuperNode authentication."""

from __future__ import annotations

import io
import json
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from rich.console import Console
from safetensors.torch import load_file

from silotune.config import load_config
from silotune.deploy import local
from silotune.deploy.local import check_deployable, deploy_local, write_supernode_key
from silotune.errors import ConfigError
from silotune.runner import plan_experiment, run_experiment
from silotune.security.tls import create_dev_pki

from .conftest import CONFIGS


def test_only_what_the_deployed_app_supports_is_deployed() -> None:
    tiny = CONFIGS / "tiny.toml"
    assert check_deployable(load_config(tiny, ["experiment.algorithms=['fedpit']"])) == "fedpit"
    with pytest.raises(ConfigError, match="one federated algorithm"):
        check_deployable(load_config(tiny))
    with pytest.raises(ConfigError, match="client-side DP clipping and SecAgg"):
        check_deployable(
            load_config(tiny, ["experiment.algorithms=['fedit']", "defence.dp='client-fixed'"])
        )


def test_supernode_keys_are_openssh_ec_keys(tmp_path: Path) -> None:
    write_supernode_key(tmp_path / "node")
    public = (tmp_path / "node.pub").read_bytes()
    assert public.startswith(b"ecdsa-sha2-nistp384 ")
    private = serialization.load_ssh_private_key((tmp_path / "node").read_bytes(), None)
    assert (
        private.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        == public.strip()
    )
    assert (tmp_path / "node").stat().st_mode & 0o077 == 0, "the private key is the owner's only"


def test_config_files_for_flower_are_valid_toml() -> None:
    values = {"silotune-config": '{"a": "b \\"c\\"", "n": [1, 2]}', "out": "/x y/z", "id": 3}
    assert tomllib.loads(local._toml(values)) == values


def _deployed_as_simulated(tmp_path: Path, *overrides: str) -> Path:
    """FedIT on the tiny preset with `overrides`, simulated and deployed: the same adapter."""
    fedit = ["experiment.algorithms=['fedit']", "eval.generate=false"]
    config = load_config(CONFIGS / "tiny.toml", [*fedit, *overrides])
    console = Console(file=io.StringIO())
    simulated = run_experiment(plan_experiment(config, tmp_path / "sim"), console)
    deployed = deploy_local(config, tmp_path / "dep", console, timeout_s=900)
    name = Path("adapters", "global", "adapter_model.safetensors")
    left, right = load_file(str(simulated / name)), load_file(str(deployed / name))
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=0, atol=1e-6)
    return deployed


@pytest.mark.slow
def test_deployed_fedit_matches_the_simulation(tmp_path: Path) -> None:
    deployed = _deployed_as_simulated(tmp_path)
    assert sorted(p.name for p in (deployed / "deploy-logs").iterdir()) == [
        "superlink.log",
        "supernode-0.log",
        "supernode-1.log",
        "supernode-2.log",
    ]
    for path in deployed.rglob("*"):  # no key or certificate outlives the federation
        if path.is_file() and path.suffix not in (".safetensors", ".png"):
            assert b"PRIVATE KEY" not in path.read_bytes(), path
    assert not (deployed / "checkpoints").exists()


def _refused(fed: local._Federation, name: str, ca: Path, key: Path) -> str:
    """Start a SuperNode with `ca` and `key`; it must exit non-zero: its log."""
    fed.start(
        name,
        [
            local._tool("flower-supernode"),
            "--superlink", f"127.0.0.1:{fed.port}",
            "--root-certificates", str(ca),
            "--auth-supernode-private-key", str(key),
            "--port", str(local._free_port()),
            "--max-retries", "2",
        ],
        name,
    )  # fmt: skip
    proc = fed.processes[-1][1]
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} was not refused within 120 s")
    assert code != 0
    time.sleep(0.5)
    return (fed.logs / f"{name}.log").read_text(errors="replace")


@pytest.mark.slow
def test_supernodes_without_valid_credentials_are_refused(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    with local._federation(logs, clients=1) as fed:
        stranger = tmp_path / "stranger"
        write_supernode_key(stranger)  # never registered with the SuperLink
        log = _refused(fed, "unregistered", fed.root / "pki" / "ca.pem", stranger)
        assert "Failed to activate SuperNode" in log
        registered = fed.root / "keys" / "known"
        write_supernode_key(registered)
        fed.flwr("supernode", "register", str(registered.with_suffix(".pub")), local._CONNECTION)
        other = tmp_path / "other-pki"
        create_dev_pki(other, ["x"])  # a CA the SuperLink's certificate does not chain to
        log = _refused(fed, "wrong-ca", other / "ca.pem", registered)
        assert "CERTIFICATE_VERIFY_FAILED" in log
    assert not fed.root.exists(), "keys and certificates are deleted with the federation"


@pytest.mark.slow
def test_a_client_killed_mid_run_is_recorded_and_the_quorum_goes_on(tmp_path: Path) -> None:
    config = load_config(
        CONFIGS / "tiny.toml",
        [
            "experiment.algorithms=['fedit']",
            "eval.generate=false",
            "federated.quorum=2",
            "federated.round_timeout_s=45",
        ],
    )
    console = Console(file=io.StringIO())
    out = deploy_local(
        config, tmp_path / "dep", console, 900, while_running=lambda fed: fed.kill("supernode-2")
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        trained = [c["client"] for c in row["clients"] if "client" in c]
        failed = [c["failed"] for c in row["clients"] if "failed" in c]
        assert sorted(trained) == [0, 1], "the two living clients train every round"
        assert all("dropped" in f or "failed" in f for f in failed)
    assert any(c.get("failed") for r in rows for c in r["clients"]), "the drop-out is recorded"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scheme", "up_over_down"),
    [
        (
            [
                "lora.client_ranks=[2, 4, 8]",
                "federated.aggregation='hetlora'",
                "federated.compression='int8'",
            ],
            0.35,
        ),
        (
            [
                "lora.client_ranks=[2, 4, 8]",
                "federated.aggregation='flora'",
                "federated.compression='nf4'",
            ],
            0.2,
        ),
        (["federated.aggregation='fedsa'"], 1.01),
        (["federated.aggregation='fedex'"], 1.01),
    ],
    ids=["hetlora-int8", "flora-nf4", "fedsa", "fedex"],
)
def test_a_deployed_federation_runs_each_upload_scheme_as_the_simulation_does(
    tmp_path: Path, scheme: list[str], up_over_down: float
) -> None:
    """A deployed node finds its rank in the run config by its partition id, codes its upload
    and keeps its own B as a simulated client does: both federations end on the same adapter."""
    deployed = _deployed_as_simulated(tmp_path, "lora.r=8", "train.rounds=1", *scheme)
    rows = [json.loads(line) for line in (deployed / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["bytes_up"] < up_over_down * rows[0]["bytes_down"]
