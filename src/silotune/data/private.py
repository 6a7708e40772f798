"""Files that hold raw records (a client's partition, the eval set): owner-only on disk."""

from __future__ import annotations

import io
from pathlib import Path

from silotune.data.partition import Partitions
from silotune.errors import UserError
from silotune.run_folder import client_eval_file, eval_file, partition_file, write_atomic


def write_private(target: Path, data: bytes) -> None:
    """Write `data` to `target` as mode 0600, in a folder of mode 0700 (created if missing).

    The folder is meant for such files only: other users can neither list nor open them.
    """
    folder = target.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkdir's mode is narrowed by the umask and ignored for a folder that already exists.
    folder.chmod(0o700)
    write_atomic(target, data, 0o600)


def partition_bytes(split: Partitions) -> dict[str, bytes]:
    """Each client's records and the eval set as JSON Lines, by file name."""
    named = {partition_file(Path(), i).name: part for i, part in enumerate(split.clients)}
    named[eval_file(Path()).name] = split.eval
    named.update({client_eval_file(Path(), i).name: e for i, e in enumerate(split.client_evals)})
    files = {}
    for name, records in named.items():
        buffer = io.BytesIO()
        records.to_json(buffer, lines=True, force_ascii=False)
        files[name] = buffer.getvalue()
    return files


def write_partitions(parts: Path, split: Partitions) -> None:
    """Each client's records in its own file (what that client alone reads), plus the eval set."""
    for name, data in partition_bytes(split).items():
        write_private(parts / name, data)


def check_partitions(parts: Path, split: Partitions) -> None:
    """A resumed run must see the same split it started with (same data, same seed)."""
    for name, data in partition_bytes(split).items():
        kept = parts / name
        if not kept.is_file() or kept.read_bytes() != data:
            raise UserError(
                f"cannot resume: the data split differs from the one the run started with "
                f"({kept.parent.name}/{kept.name}); restore the original data at data.path"
            )
