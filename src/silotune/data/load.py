"""Load instruction records from local files or the hub into a `datasets.Dataset`.

Every loaded dataset has the columns `instruction`, `input`, `output` (strings) and, when a
label field is configured, `label`: the mapping from the source's own column names is the
config's `data.*_field` keys (MedQuAD: question -> instruction, answer -> output).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from silotune.config import DataConfig
from silotune.data.bundled_data import BUNDLED_PREFIX, bundled_path
from silotune.errors import DataError

_SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}


@dataclass(frozen=True)
class LoadedData:
    """The usable records plus how many source rows were dropped and why."""

    dataset: datasets.Dataset
    source_rows: int
    dropped_empty: int


def resolve_data_path(path: str) -> Path:
    """Turn `bundled:NAME` into the packaged file; other paths are taken as given."""
    if path.startswith(BUNDLED_PREFIX):
        resolved = bundled_path(path.removeprefix(BUNDLED_PREFIX))
    else:
        resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise DataError(f"data file not found: {path} (set data.path to an existing file)")
    return resolved


def load_records(cfg: DataConfig) -> LoadedData:
    """Load, map fields and drop records whose instruction or output is empty."""
    raw = _load_raw(cfg)
    mapping = {"instruction": cfg.instruction_field, "output": cfg.output_field}
    if cfg.input_field:
        mapping["input"] = cfg.input_field
    if cfg.label_field:
        mapping["label"] = cfg.label_field
    for role, column in mapping.items():
        if column not in raw.column_names:
            raise DataError(
                f"data.{role}_field names column {column!r}, which {cfg.path} does not have "
                f"(columns: {', '.join(raw.column_names)})"
            )

    def to_record(row: dict[str, Any]) -> dict[str, str]:
        rec = {role: _text(row[column]) for role, column in mapping.items()}
        rec.setdefault("input", "")
        return rec

    mapped = raw.map(to_record, remove_columns=raw.column_names, desc="mapping fields")
    kept = mapped.filter(lambda r: bool(r["instruction"].strip() and r["output"].strip()))
    if len(kept) == 0:
        raise DataError(f"{cfg.path} has no record with a non-empty instruction and output")
    return LoadedData(kept, source_rows=len(raw), dropped_empty=len(raw) - len(kept))


def _load_raw(cfg: DataConfig) -> datasets.Dataset:
    if cfg.format == "hub":
        try:
            loaded = datasets.load_dataset(cfg.path, split=cfg.hub_split)
        except Exception as exc:  # the hub raises many types; the user needs one message
            raise DataError(f"could not load hub dataset {cfg.path!r}: {exc}") from None
        assert isinstance(loaded, datasets.Dataset)
        return loaded
    path = resolve_data_path(cfg.path)
    fmt = cfg.format if cfg.format != "auto" else _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"cannot tell the format of {path.name} from its suffix; set data.format to one of "
            "jsonl, json, csv, parquet"
        )
    try:
        loaded = datasets.load_dataset(
            _BUILDERS[fmt], data_files=str(path), split="train", keep_in_memory=True
        )
    except Exception as exc:  # parse errors come from pyarrow/json with many types
        raise DataError(f"could not read {path} as {fmt}: {exc}") from None
    assert isinstance(loaded, datasets.Dataset)
    return loaded


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def load_partition_file(path: Path) -> datasets.Dataset:
    """Read a client's partition as written by the runner (instruction/input/output[/label])."""
    if not path.is_file():
        raise DataError(f"partition file not found: {path}")
    loaded = datasets.load_dataset("json", data_files=str(path), split="train", keep_in_memory=True)
    assert isinstance(loaded, datasets.Dataset)
    return loaded


def as_records(dataset: datasets.Dataset) -> list[dict[str, str]]:
    """Plain instruction/input/output dicts (what prompts and self-generation work on)."""
    return [{k: str(r[k]) for k in ("instruction", "input", "output")} for r in dataset]
