"""The configuration reference is generated from the config dataclasses: every key carries help,
the page lists every key with a default that reads back as that default, and the committed docs
pages are what the code generates."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from silotune.config import Config, config_from_dict
from silotune.config_reference import keys, markdown, sections

ROOT = Path(__file__).resolve().parent.parent


def test_every_key_has_help() -> None:
    missing = [f"{k.section}.{k.name}" for k in keys() if len(k.help.split()) < 3]
    assert not missing, f"config fields without a help string: {missing}"


def test_every_section_has_an_introduction() -> None:
    bare = [name for name, cls in sections() if not (cls.__doc__ or "").strip()]
    assert not bare


def test_reference_lists_every_key_with_a_default_that_reads_back() -> None:
    page = markdown()
    rows: dict[str, dict[str, str]] = {}
    section = ""
    for line in page.splitlines():
        heading = re.fullmatch(r"## `\[(\w+)\]`", line)
        if heading:
            section = heading.group(1)
            rows[section] = {}
            continue
        row = re.fullmatch(r"\| `(\w+)` \| .+? \| `(.*?)` \| .* \|", line)
        if row:
            rows[section][row.group(1)] = row.group(2)
    expected = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in sections()}
    assert {s: list(r) for s, r in rows.items()} == expected
    # Every default, written into a config file exactly as the page prints it, gives the
    # default config back.
    toml = "\n".join(
        f"[{s}]\n" + "\n".join(f"{k} = {v}" for k, v in r.items()) for s, r in rows.items()
    )
    assert config_from_dict(tomllib.loads(toml), algorithm_checks=False) == Config()


def test_bounds_and_choices_are_shown() -> None:
    by_key = {f"{k.section}.{k.name}": k for k in keys()}
    assert by_key["train.lr"].bound == "> 0"
    assert by_key["lora.r"].bound == "≥ 1"
    assert by_key["partition.method"].type == '`"iid"` \\| `"dirichlet"`'
    assert by_key["experiment.seeds"].type == "list of int"


def test_committed_docs_pages_are_current() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
