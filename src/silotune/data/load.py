"""Load instruction records from local files or the hub into a `datasets.Dataset`.

Every loaded dataset has the columns `instruction`, `input`, `output` (strings) and, when a
label field is configured, `label`: the mapping from the source's own column names is the
config's `data.*_field` keys (MedQuAD: question -> instruction, answer -> output). A task
phrased as a cloze (RTE) instead fills `data.instruction_template` from several columns and
rewrites outputs through `data.output_map` (entailment -> yes).

Malformed rows (not UTF-8, not a JSON object, a missing or empty instruction or output) are
skipped and counted by reason, or, with `data.bad_rows = "fail"`, rejected with their row number.
A client's own file (`split-client --data`, a SuperNode's `data-path`) gets the same treatment.
"""

from __future__ import annotations

import dataclasses
import json
import string
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from silotune.config_sections import DataConfig
from silotune.data.bundled_data import BUNDLED_PREFIX, bundled_path
from silotune.data.private import write_private
from silotune.errors import DataError

_SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}
# The columns of the records `silotune run` writes for its clients (already mapped); `label` too
# when the config names a label field.
_RECORD_COLUMNS = ("instruction", "input", "output")


@dataclass(frozen=True)
class LoadedData:
    """The usable records plus how many source rows were dropped and why."""

    dataset: datasets.Dataset
    source_rows: int
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> rows

    @property
    def dropped_empty(self) -> int:
        """Rows left out for an empty or missing instruction or output."""
        return self.dropped[_EMPTY]

    def describe_dropped(self) -> str:
        """E.g. '3 dropped (2 empty instruction or output, 1 not valid JSON)', or ''."""
        if not self.dropped:
            return ""
        parts = ", ".join(f"{n} {reason}" for reason, n in self.dropped.most_common())
        return f"{sum(self.dropped.values())} dropped ({parts})"


_EMPTY = "empty instruction or output"


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
    """Load, map fields (or fill the template), map outputs, drop empty instructions/outputs."""
    raw, rows = _load_raw(cfg)
    return _mapped(cfg, raw, rows)


def load_client_records(path: Path, cfg: DataConfig) -> LoadedData:
    """One client's own file, read as `load_records` reads `data.path` (same field mapping and
    bad-row policy); its format is told by its suffix.

    A file holding exactly the columns `silotune run` writes its partitions with (instruction,
    input, output and maybe label) is already mapped and is read as it is.
    """
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    own = dataclasses.replace(cfg, path=str(path), format="auto")
    raw, rows = _load_raw(own)
    if set(raw.column_names) - {"label"} == set(_RECORD_COLUMNS):
        own = dataclasses.replace(
            own,
            instruction_field="instruction",
            input_field="input",
            output_field="output",
            label_field="label" if "label" in raw.column_names else "",
            instruction_template="",
            output_map=(),
        )
    return _mapped(own, raw, rows)


def _mapped(cfg: DataConfig, raw: datasets.Dataset, rows: _Rows) -> LoadedData:
    """The records of `raw` under the config's mapping, with its bad rows skipped or refused."""
    mapping = {"output": cfg.output_field}
    if not cfg.instruction_template:
        mapping["instruction"] = cfg.instruction_field
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
    template_columns = _template_columns(cfg, raw.column_names)
    outputs = cfg.output_mapping()
    if outputs:
        _check_outputs_mapped(cfg, outputs, raw[cfg.output_field])

    def to_record(row: dict[str, Any]) -> dict[str, str]:
        rec = {role: _text(row[column]) for role, column in mapping.items()}
        if cfg.instruction_template:
            values = {column: _text(row[column]) for column in template_columns}
            rec["instruction"] = _fill(cfg.instruction_template, values)
        if outputs and rec["output"].strip():
            rec["output"] = outputs[rec["output"].strip()]
        rec.setdefault("input", "")
        return rec

    mapped = raw.map(to_record, remove_columns=raw.column_names, desc="mapping fields")
    usable = [bool(r["instruction"].strip() and r["output"].strip()) for r in mapped]
    if cfg.bad_rows == "fail" and not all(usable):
        row = usable.index(False)
        raise DataError(
            f"{cfg.path} {rows.name(row)}: {_EMPTY}; fix the row or set data.bad_rows = 'skip'"
        )
    kept = mapped.select([i for i, ok in enumerate(usable) if ok])
    if len(kept) == 0:
        raise DataError(f"{cfg.path} has no record with a non-empty instruction and output")
    dropped = Counter(rows.dropped)
    if len(kept) < len(raw):
        dropped[_EMPTY] = len(raw) - len(kept)
    return LoadedData(kept, source_rows=len(raw) + rows.total_dropped, dropped=dropped)


def _template_columns(cfg: DataConfig, columns: list[str]) -> list[str]:
    """The columns `data.instruction_template` names, each checked to exist."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(cfg.instruction_template)]
    except ValueError as exc:  # unbalanced braces
        raise DataError(
            f"data.instruction_template is not a valid format string ({exc}); write columns "
            "as {column} and literal braces as {{ }}"
        ) from None
    used = [name for name in names if name is not None]
    for name in used:
        if not name or name.isdigit():
            raise DataError(
                "data.instruction_template has a positional field; name a column in each "
                f"pair of braces (columns: {', '.join(columns)})"
            )
        if name not in columns:
            raise DataError(
                f"data.instruction_template names column {name!r}, which {cfg.path} does not "
                f"have (columns: {', '.join(columns)})"
            )
    return sorted(set(used))


def _fill(template: str, values: dict[str, str]) -> str:
    try:
        return template.format_map(values)
    except ValueError as exc:  # a format spec that text cannot take, e.g. {idx:d}
        raise DataError(f"data.instruction_template cannot be filled: {exc}") from None


def _check_outputs_mapped(cfg: DataConfig, outputs: dict[str, str], values: list[Any]) -> None:
    """Every non-empty output value must have an entry in `data.output_map`."""
    unmapped = sorted({_text(v).strip() for v in values} - set(outputs) - {""})
    if unmapped:
        shown = ", ".join(map(repr, unmapped[:5])) + (" ..." if len(unmapped) > 5 else "")
        raise DataError(
            f"data.output_map has no entry for {len(unmapped)} value(s) of column "
            f"{cfg.output_field!r}: {shown}; add 'value=target' entries for them "
            f"(mapped now: {', '.join(outputs)})"
        )


@dataclass
class _Rows:
    """Which source rows survived the text screening, to name rows in messages."""

    numbers: list[int] | None = None  # 1-based line of each kept row (JSON Lines)
    dropped: Counter[str] = field(default_factory=Counter)

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    def name(self, index: int) -> str:
        if self.numbers is not None:
            return f"line {self.numbers[index]}"
        return f"row {index + 1}"


def _load_raw(cfg: DataConfig) -> tuple[datasets.Dataset, _Rows]:
    if cfg.format == "hub":
        try:
            loaded = datasets.load_dataset(cfg.path, split=cfg.hub_split)
        except Exception as exc:  # the hub raises many types; the user needs one message
            raise DataError(f"could not load hub dataset {cfg.path!r}: {exc}") from None
        assert isinstance(loaded, datasets.Dataset)
        return loaded, _Rows()
    path = resolve_data_path(cfg.path)
    fmt = cfg.format if cfg.format != "auto" else _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"cannot tell the format of {path.name} from its suffix; set data.format to one of "
            "jsonl, json, csv, parquet"
        )
    if fmt == "jsonl":
        return _load_json_lines(path, cfg)
    rows = _Rows()
    with tempfile.TemporaryDirectory() as tmp:
        if fmt == "csv":  # a line that is not UTF-8 is a bad row; JSON and Parquet are whole
            path = _utf8_lines(path, cfg, rows, Path(tmp) / path.name)
        try:
            loaded = datasets.load_dataset(
                _BUILDERS[fmt], data_files=str(path), split="train", keep_in_memory=True
            )
        except Exception as exc:  # parse errors come from pyarrow/json with many types
            raise DataError(f"could not read {path} as {fmt}: {exc}") from None
    assert isinstance(loaded, datasets.Dataset)
    return loaded, rows


def _load_json_lines(path: Path, cfg: DataConfig) -> tuple[datasets.Dataset, _Rows]:
    """One JSON object per line; a line that is not one is a bad row."""
    records: list[dict[str, Any]] = []
    rows = _Rows(numbers=[])
    assert rows.numbers is not None
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                problem = "" if isinstance(record, dict) else "not a JSON object"
            except UnicodeDecodeError:
                problem = "not UTF-8"
            except json.JSONDecodeError:
                problem = "not valid JSON"
            if problem:
                _bad_row(cfg, f"{path} line {number}", problem, rows)
                continue
            records.append(record)
            rows.numbers.append(number)
    if not records:
        found = ", ".join(f"{n} {why}" for why, n in rows.dropped.most_common()) or "empty"
        raise DataError(f"could not read {path}: no line is a JSON object ({found})")
    columns = list(dict.fromkeys(k for r in records for k in r))
    table = {c: [r.get(c) for r in records] for c in columns}
    try:
        return datasets.Dataset.from_dict(table), rows
    except (TypeError, ValueError, pa.ArrowException):  # a column mixes types: keep it as text
        text = {c: [None if v is None else _text(v) for v in vs] for c, vs in table.items()}
        return datasets.Dataset.from_dict(text), rows


def _utf8_lines(path: Path, cfg: DataConfig, rows: _Rows, target: Path) -> Path:
    """`path` itself when every line is UTF-8; else a copy without the bad lines."""
    lines = path.read_bytes().splitlines(keepends=True)
    good = []
    for number, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
            good.append(line)
        except UnicodeDecodeError:
            _bad_row(cfg, f"{path} line {number}", "not UTF-8", rows)
    if len(good) == len(lines):
        return path
    write_private(target, b"".join(good))
    return target


def _bad_row(cfg: DataConfig, where: str, problem: str, rows: _Rows) -> None:
    if cfg.bad_rows == "fail":
        raise DataError(f"{where}: {problem}; fix the row or set data.bad_rows = 'skip'")
    rows.dropped[problem] += 1


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
