"""Files that hold raw records (a client's partition, the eval set): owner-only on disk."""

from __future__ import annotations

from pathlib import Path

from silotune.run_folder import write_atomic


def write_private(target: Path, data: bytes) -> None:
    """Write `data` to `target` as mode 0600, in a folder of mode 0700 (created if missing).

    The folder is meant for such files only: other users can neither list nor open them.
    """
    folder = target.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkdir's mode is narrowed by the umask and ignored for a folder that already exists.
    folder.chmod(0o700)
    write_atomic(target, data, 0o600)
