"""Output folders on disk: one that cannot be written is refused before any work starts, and a
disk that fills up mid-run is one message saying how to go on, not a traceback."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from silotune.errors import UserError

_FULL = (errno.ENOSPC, errno.EDQUOT)


def check_writable(folder: Path, option: str) -> None:
    """Raise a UserError naming `option` unless `folder` exists or can be created, writable."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {folder}: {existing} is a file, not a folder; choose another")
    # Permission bits do not tell a read-only mount, nor what root may do: try it.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".silotune-probe-", dir=existing))
    except OSError as exc:
        raise UserError(
            f"{option} {folder} cannot be written ({exc.strerror} in {existing}); choose a "
            "writable folder"
        ) from None


@contextmanager
def on_full_disk(how_to_go_on: str) -> Iterator[None]:
    """Turn a full disk (or quota) inside the block into a UserError ending `how_to_go_on`."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _FULL:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        raise UserError(f"no space left on the device{where}; {how_to_go_on}") from None
