"""Data files shipped inside the package (see `bundled/README.md` for licence and attribution)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

BUNDLED_PREFIX = "bundled:"


def bundled_path(name: str) -> Path:
    """Filesystem path of a bundled data file, e.g. `medquad_demo.jsonl`."""
    return Path(str(resources.files("silotune.data") / "bundled" / name))


def bundled_texts() -> Iterator[str]:
    """Question and answer texts of the bundled MedQuAD demo subset."""
    with bundled_path("medquad_demo.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            yield rec["question"]
            yield rec["answer"]
