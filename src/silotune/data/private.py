"""Files that hold raw records (a client's partition, the eval set): owner-only on disk."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(target: Path, data: bytes) -> None:
    """Write `data` to `target` as mode 0600, in a folder of mode 0700 (created if missing).

    The folder is meant for such files only: other users can neither list nor open them.
    """
    folder = target.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkdir's mode is narrowed by the umask and ignored for a folder that already exists.
    folder.chmod(0o700)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)  # an existing file keeps its old mode through O_CREAT
        fh.write(data)
