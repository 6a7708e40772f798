"""The canary audit in runs: canaries go into one client's partition before it is written, are
kept for a resume, and after training give an empirical ε lower bound beside the ledger's ε."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch

from silotune.algorithms import ALGORITHMS
from silotune.cli import main
from silotune.config import Config, load_config
from silotune.data.load import load_records
from silotune.data.partition import Partitions, split_dataset
from silotune.data.private import check_partitions, write_partitions
from silotune.errors import ConfigError, UserError
from silotune.jobs import AlgorithmResult, RoundLog
from silotune.privacy.audit import (
    CANARY_LABEL,
    draw_canaries,
    insert_canaries,
    prepare_canaries,
    released_state,
    save_canaries,
)
from silotune.privacy.ledger import epsilon_from_json
from silotune.report.markdown import audit_line
from silotune.run_folder import canaries_file

from .conftest import CONFIGS


def _config(*more: str) -> Config:
    return load_config(CONFIGS / "tiny.toml", ["privacy.audit=true", "privacy.canaries=20", *more])


def _split(config: Config) -> Partitions:
    loaded = load_records(config.data)
    return split_dataset(loaded.dataset, config.data, config.partition, config.experiment.seed)


def test_exactly_the_included_canaries_join_the_audited_client() -> None:
    config = _config("privacy.audit_client=1")
    split = _split(config)
    canaries = draw_canaries(config)
    assert canaries.client == 1 and len(canaries.records) == 20
    assert 0 < sum(canaries.included) < 20
    audited = insert_canaries(split, canaries)
    before, after = split.clients[1], audited.clients[1]
    assert len(after) == len(before) + sum(canaries.included)
    assert after.select(range(len(before))).to_list() == before.to_list()
    added = after.select(range(len(before), len(after))).to_list()
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in added] == list(
        canaries.inserted()
    )
    assert {r["label"] for r in added} == {CANARY_LABEL}
    # The canaries left out appear nowhere; the other clients and the eval set are untouched.
    texts = {r["output"] for part in audited.clients for r in part.to_list()}
    left_out = [r for r, x in zip(canaries.records, canaries.included, strict=True) if not x]
    assert not texts & {r["output"] for r in left_out}
    for c in (0, 2):
        assert audited.clients[c].to_list() == split.clients[c].to_list()
    assert audited.eval.to_list() == split.eval.to_list()


def test_canaries_are_reproducible_and_follow_the_data_fields() -> None:
    config = _config()
    assert draw_canaries(config) == draw_canaries(config)
    assert draw_canaries(config) != draw_canaries(_config("experiment.seed=1"))
    # No data.input_field: canaries leave the input empty, as the data's records do.
    assert all(r["input"] == "" and r["instruction"] for r in draw_canaries(config).records)
    with_input = draw_canaries(_config('data.input_field="qtype"'))
    assert all(r["input"] for r in with_input.records)


def test_a_resumed_run_reads_its_canaries_back(tmp_path: Path) -> None:
    config = _config()
    parts = tmp_path / "partitions"
    # Nothing saved yet (stopped before the split was written): drawn as a new run would.
    assert prepare_canaries(config, parts, resuming=True) == draw_canaries(config)
    saved = draw_canaries(config)
    saved = type(saved)(saved.client, saved.records, tuple(not x for x in saved.included))
    save_canaries(parts, saved)
    file = canaries_file(parts)
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert stat.S_IMODE(parts.stat().st_mode) == 0o700
    back = prepare_canaries(config, parts, resuming=True)
    assert back == saved  # read, not drawn again
    split = _split(config)
    write_partitions(parts, insert_canaries(split, saved))
    check_partitions(parts, insert_canaries(split, back))  # the resumed run's split is the same
    assert prepare_canaries(config, parts, resuming=False) == draw_canaries(config)
    with pytest.raises(UserError, match="cannot resume"):
        prepare_canaries(_config("privacy.canaries=30"), parts, resuming=True)


def test_audit_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="audit_client"):
        _config("privacy.audit_client=3")
    with pytest.raises(ConfigError, match="canaries"):
        _config("privacy.canaries=1")
    with pytest.raises(ConfigError, match="audit_guesses"):
        _config("privacy.audit_guesses=21")


def test_the_audit_scores_the_model_the_algorithm_released() -> None:
    state = {"w": torch.zeros(2)}
    rounds = [RoundLog(round=1, metrics={}, train_loss=1.0)]
    result = AlgorithmResult(rounds=rounds, adapters={"global": state})
    assert released_state(ALGORITHMS.get("fedit"), result, 1) is state
    result.adapters = {"client-0": {}, "client-1": state}
    assert released_state(ALGORITHMS.get("locit"), result, 1) is state
    assert "keeps no adapter" in str(released_state(ALGORITHMS.get("locit"), result, 2))
    # Split models are whole-model PEFT adapters: LoRA ones load into the run's own slots.
    result.adapter_config = {"peft_type": "LORA"}
    assert released_state(ALGORITHMS.get("split"), result, 1) is state
    result.adapters = {"global": state}  # split-central: one model of the pooled records
    assert released_state(ALGORITHMS.get("split-central"), result, 0) is state
    result.adapter_config = {"peft_type": "PREFIX_TUNING"}
    reason = released_state(ALGORITHMS.get("split"), result, 0)
    assert isinstance(reason, str) and reason.startswith("not audited yet")


def test_the_report_puts_the_audit_beside_the_ledger() -> None:
    privacy = {
        "clients": {"0": {"epsilon": 3.5}},
        "audit": {
            "client": 0,
            "guesses": 40,
            "correct": 31,
            "epsilon_lower_bound": 0.81234,
            "confidence": 0.95,
        },
    }
    assert audit_line(privacy) == (
        "Canary audit (client 0): empirical ε ≥ 0.812 at 95 % confidence (31 of 40 guesses "
        "right), against the ledger's ε = 3.5."
    )


# A non-private run overfit to few records: one client of 4 records plus about 30 canaries,
# trained long at a high learning rate; the auditor guesses on every canary.
_OVERFIT = (
    'experiment.algorithms=["locit"]',
    'partition.method="iid"',
    "partition.clients=1",
    "partition.max_examples_per_client=4",
    "train.rounds=1",
    "train.batch_size=8",
    "train.lr=0.05",
    "eval.generate=false",
    "privacy.audit=true",
    "privacy.canaries=60",
)


def _audited_run(out: Path, *more: str, command: tuple[str, ...] = ("run",)) -> dict[str, object]:
    args = [*command, str(CONFIGS / "tiny.toml"), "--out", str(out)]
    for item in (*_OVERFIT, *more):
        args += ["--set", item]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    privacy: dict[str, object] = summary["privacy"]
    assert "Canary audit (client 0): empirical ε ≥" in (out / "report.md").read_text()
    return privacy


@pytest.mark.slow
def test_the_audit_catches_memorisation_and_respects_dp(tmp_path: Path) -> None:
    """Without DP the bound is clearly above 1; with DP-SGD it stays below the ledger's ε."""
    plain = _audited_run(tmp_path / "plain", "train.local_steps=150")
    audit = plain["audit"]
    assert isinstance(audit, dict)
    # Measured: 58 of 60 right, ε >= 1.89, the most 28 canaries in and 30 "in" guesses allow;
    # the δ term (2mδ, δ = 1 / (10 x 32 records)) keeps even that near 2.
    assert audit["guesses"] == 60 and audit["epsilon_lower_bound"] > 1.5
    private = _audited_run(
        tmp_path / "dp",
        "train.local_steps=40",
        'privacy.mode="dp-sgd"',
        "privacy.noise_multiplier=1.0",
        command=("audit", "canaries"),  # the same, with the audit's own command
    )
    audit, clients = private["audit"], private["clients"]
    assert isinstance(audit, dict) and isinstance(clients, dict)
    ledger = epsilon_from_json(clients["0"]["epsilon"])
    assert 0 < ledger < float("inf")
    assert audit["epsilon_lower_bound"] <= ledger
