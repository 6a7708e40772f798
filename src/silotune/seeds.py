"""Seeds derived from the experiment's seed: one stream per purpose, the same on every machine."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from any mix of ints and names (same on every machine)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
