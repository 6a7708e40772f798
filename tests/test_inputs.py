"""Inputs a user gets wrong: one message naming what to fix, exit code 2, nothing half-written;
a client's own data file is checked as `silotune run` checks `data.path`; raw records are
owner-only on disk."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
from pathlib import Path

import pytest

from silotune.cli import main
from silotune.config import load_config
from silotune.config_sections import DataConfig
from silotune.data.load import load_client_records, load_records
from silotune.errors import DataError

from .conftest import CONFIGS

TINY = str(CONFIGS / "tiny.toml")
NAN_KEYS = [
    ("train", "lr"),
    ("federated", "fraction_train"),
    ("partition", "alpha"),
    ("federated", "round_timeout_s"),
]


def _fails_cleanly(argv: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI; assert exit code 2, no traceback, no folder; the message, on one line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert not out.exists() and not out.with_name(out.name + ".incomplete").exists()
    return " ".join(err.split())


@pytest.mark.parametrize(("section", "key"), NAN_KEYS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("how", ["file", "--set"])
def test_non_finite_numbers_are_refused_naming_the_key(
    section: str,
    key: str,
    value: str,
    how: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    if how == "file":
        config = tmp_path / "c.toml"
        config.write_text(_with_value(section, key, value))
        argv = ["run", str(config), "--out", str(out)]
    else:
        argv = ["run", TINY, "--out", str(out), "--set", f"{section}.{key}={value}"]
    message = _fails_cleanly(argv, out, capsys)
    assert f"{section}.{key} must be a finite number" in message


def _with_value(section: str, key: str, value: str) -> str:
    """The tiny preset with `section.key = value` (replacing the key if the preset sets it)."""
    lines = CONFIGS.joinpath("tiny.toml").read_text().splitlines()
    kept = []
    current = ""
    for line in lines:
        if line.startswith("["):
            current = line.strip("[]")
        if current == section and line.split("=")[0].strip() == key:
            continue
        kept.append(line)
        if line == f"[{section}]":
            kept.append(f"{key} = {value}")
    if f"[{section}]" not in lines:
        kept += [f"[{section}]", f"{key} = {value}"]
    return "\n".join(kept) + "\n"


def test_a_config_file_that_is_not_utf8_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes(CONFIGS.joinpath("tiny.toml").read_bytes() + b"# caf\xe9\n")
    out = tmp_path / "run"
    message = _fails_cleanly(["run", str(config), "--out", str(out)], out, capsys)
    assert f"{config} is not UTF-8 text" in message and "save it as UTF-8" in message


def _commands(out: str) -> list[list[str]]:
    """Every command that writes a folder, with `out` as that folder."""
    client = ["--insecure", "--id", "a", "--server", "127.0.0.1:9", "--data", TINY, "--eval", TINY]
    return [
        ["run", TINY, "--out", out],
        ["deploy", "local", TINY, "--set", 'experiment.algorithms=["fedit"]', "--out", out],
        ["split-server", TINY, "--insecure", "--out", out],
        ["split-client", TINY, *client, "--out", out],
        ["certs", out, "--clients", "a"],
    ]


@pytest.mark.parametrize("command", range(len(_commands(""))))
def test_an_out_under_a_regular_file_is_refused_before_any_work(
    command: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "run"
    message = _fails_cleanly(_commands(str(out))[command], out, capsys)
    assert f"{out}: {blocker} is a file, not a folder" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_an_out_on_a_read_only_file_system_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tempfile

    # Tests run as root, which permission bits do not stop: fail the write as a read-only mount.
    def read_only(*args: object, **kwargs: object) -> str:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    out = tmp_path / "ro" / "run"
    message = _fails_cleanly(["run", TINY, "--out", str(out)], out, capsys)
    assert f"--out {out} cannot be written (Read-only file system in {tmp_path})" in message


def test_a_full_disk_mid_run_says_how_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import silotune.runner

    def full(target: Path, data: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(silotune.runner, "write_json", full)
    out = tmp_path / "run"
    code = main(["run", TINY, "--out", str(out)])
    err = " ".join(capsys.readouterr().err.split())
    work = out.with_name("run.incomplete")
    assert code == 2 and "Traceback" not in err
    assert "no space left on the device writing" in err
    assert f"{work} stays resumable" in err and f"silotune run --resume {work}" in err
    assert work.is_dir()  # kept: it is what a resume continues


def test_numbers_on_the_command_line_must_be_finite() -> None:
    with pytest.raises(SystemExit) as info:
        main(["deploy", "local", TINY, "--timeout", "nan"])
    assert info.value.code == 2


def _custom_columns(tmp_path: Path) -> Path:
    """A client's own file in its own column names, with one row of every bad kind."""
    rows = [
        json.dumps({"ask": "What is A?", "reply": "A is a letter.", "kind": "x"}).encode(),
        b'{"ask": "caf\xe9", "reply": "latin-1, not UTF-8", "kind": "x"}',
        b'["not", "an", "object"]',
        json.dumps({"ask": "No reply?", "reply": "", "kind": "y"}).encode(),
        json.dumps({"ask": "What is B?", "reply": "B follows A.", "kind": "y"}).encode(),
    ]
    path = tmp_path / "mine.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


def _mine(path: Path) -> DataConfig:
    return DataConfig(
        path=str(path), instruction_field="ask", output_field="reply", label_field="kind"
    )


def test_a_clients_own_file_is_mapped_and_screened_as_silotune_run_does(tmp_path: Path) -> None:
    path = _custom_columns(tmp_path)
    # The config names the run's data elsewhere; the client's file is checked the same way.
    cfg = dataclasses.replace(_mine(path), path="bundled:medquad_demo.jsonl", format="csv")
    own = load_client_records(path, cfg)
    as_run = load_records(_mine(path))
    assert own.dataset.to_list() == as_run.dataset.to_list()
    assert own.dataset["instruction"] == ["What is A?", "What is B?"]
    assert (
        own.dropped
        == as_run.dropped
        == {
            "not UTF-8": 1,
            "not a JSON object": 1,
            "empty instruction or output": 1,
        }
    )
    with pytest.raises(DataError, match=r"mine\.jsonl line 2: not UTF-8; fix the row or set"):
        load_client_records(path, dataclasses.replace(cfg, bad_rows="fail"))
    with pytest.raises(DataError, match=r"data\.output_field names column 'answer'"):
        load_client_records(path, dataclasses.replace(cfg, output_field="answer"))


def test_partitions_written_by_the_runner_are_read_as_they_are(tmp_path: Path) -> None:
    from silotune.config_sections import PartitionConfig
    from silotune.data.partition import split_dataset
    from silotune.data.private import write_partitions

    # A cloze task: the runner's records were filled from a template and their outputs mapped,
    # so reading them through the template and the map again would fail.
    source = tmp_path / "rte.jsonl"
    rows = [
        {
            "premise": f"P{i}",
            "hypothesis": f"H{i}",
            "label": ("entailment", "not_entailment")[i % 2],
        }
        for i in range(12)
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(
        path=str(source),
        instruction_template="{premise} Question: {hypothesis}?",
        output_field="label",
        output_map=("entailment=yes", "not_entailment=no"),
        label_field="label",
        eval_size=4,
    )
    split = split_dataset(load_records(cfg).dataset, cfg, PartitionConfig(method="iid"), seed=0)
    write_partitions(tmp_path / "parts", split)
    loaded = load_client_records(tmp_path / "parts" / "client-0.jsonl", cfg)
    assert loaded.dataset.to_list() == split.clients[0].to_list()
    assert loaded.dataset[0]["output"] in ("yes", "no") and not loaded.dropped


def test_split_client_refuses_a_bad_row_before_loading_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _custom_columns(tmp_path)
    out = tmp_path / "client"
    fields = ["--set", "data.instruction_field=ask", "--set", "data.output_field=reply"]
    argv = ["split-client", TINY, *fields, "--set", "data.bad_rows=fail", "--insecure"]
    argv += ["--id", "a", "--server", "127.0.0.1:9", "--data", str(path), "--eval", str(path)]
    message = _fails_cleanly([*argv, "--out", str(out)], out, capsys)
    assert f"{path} line 2: not UTF-8; fix the row or set data.bad_rows = 'skip'" in message


def test_a_deployed_node_reads_its_own_columns(tmp_path: Path) -> None:
    from silotune.federated.client_app import ClientSpec, _local_data
    from silotune.modeling.load import resolve_model

    cfg = load_config(TINY, ["data.instruction_field=ask", "data.output_field=reply"])
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, label_field="kind"))
    spec = ClientSpec(
        config=cfg,
        source=resolve_model(cfg.model),
        partitions_dir="",
        algorithm="fedit",
        clients_dir=str(tmp_path / "state"),
        data_path=str(_custom_columns(tmp_path)),
    )
    records, examples = _local_data(spec, 0)
    assert [r["instruction"] for r in records] == ["What is A?", "What is B?"]
    assert len(examples) == 2


def test_partition_files_are_owner_only(tmp_path: Path) -> None:
    from silotune.data.partition import split_dataset
    from silotune.data.private import write_partitions

    cfg = load_config(TINY)
    split = split_dataset(load_records(cfg.data).dataset, cfg.data, cfg.partition, seed=0)
    parts = tmp_path / "partitions"
    parts.mkdir(mode=0o755)
    (parts / "eval.jsonl").write_text("stale")
    os.chmod(parts / "eval.jsonl", 0o644)
    old = os.umask(0)  # the modes must not depend on the caller's umask
    try:
        write_partitions(parts, split)
    finally:
        os.umask(old)
    assert stat.S_IMODE(parts.stat().st_mode) == 0o700
    files = sorted(parts.iterdir())
    assert [f.name for f in files] == [
        "client-0.jsonl",
        "client-1.jsonl",
        "client-2.jsonl",
        "eval.jsonl",
    ]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
