"""The run folder's paths and its atomic writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from silotune.errors import UserError
from silotune.run_folder import (
    RunFolder,
    finished_folder,
    read_folder,
    refuse_leftover,
    work_folder,
    write_atomic,
    write_folder_atomic,
)


def test_layout_and_the_final_rename(tmp_path: Path) -> None:
    out = tmp_path / "run"
    work = RunFolder(work_folder(out))
    assert work.root.name == "run.incomplete" and finished_folder(work.root) == out
    assert work.partition(2) == work.root / "partitions" / "client-2.jsonl"
    assert work.split_process("client-0") == work.root / "split" / "client-0"
    assert work.result("fedit", several=True).summary == work.root / "fedit" / "summary.json"
    assert work.result("fedit", several=False) == work
    work.root.mkdir()
    with pytest.raises(UserError, match="holds an interrupted run"):
        refuse_leftover(out)
    assert work.finish() == out and out.is_dir() and not work.root.exists()


def test_atomic_files_keep_the_modes_asked_for(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "plain", b"a")
        write_atomic(tmp_path / "key", b"b", 0o600)
        write_atomic(tmp_path / "key", b"c", 0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600
    assert (tmp_path / "key").read_bytes() == b"c"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key", "plain"]


def test_a_failed_folder_write_leaves_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    write_folder_atomic(target, lambda tmp: (tmp / "v").write_text("1"))

    def fail(tmp: Path) -> None:
        (tmp / "v").write_text("2")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_atomic(target, fail)
    assert (target / "v").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    write_folder_atomic(target, lambda tmp: (tmp / "v").write_text("3"), replace=False)
    assert (target / "v").read_text() == "1", "without replace, the first copy stays"
    target.rename(tmp_path / "ckpt.old")  # cut between the two renames
    found = read_folder(target)
    assert found is not None and (found / "v").read_text() == "1"
