"""Loading with field mappings, bad data, and deterministic, skewed partitions."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import datasets
import pytest

from silotune.config_sections import DataConfig, PartitionConfig
from silotune.data.load import load_records
from silotune.data.partition import split_dataset
from silotune.errors import DataError

MEDQUAD = DataConfig()


def _records(n: int, labels: int = 4) -> datasets.Dataset:
    return datasets.Dataset.from_list(
        [
            {"instruction": f"q{i}", "input": "", "output": f"a{i}", "label": f"l{i % labels}"}
            for i in range(n)
        ]
    )


def test_bundled_medquad_maps_fields() -> None:
    loaded = load_records(MEDQUAD)
    ds = loaded.dataset
    assert set(ds.column_names) == {"instruction", "input", "output", "label"}
    assert len(ds) == 480 and loaded.dropped_empty == 0
    assert ds[0]["instruction"].endswith("?")
    assert len(set(ds["label"])) == 8


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_local_formats(tmp_path: Path, fmt: str) -> None:
    rows = [
        {"prompt": "p1", "context": "c1", "reply": "r1"},
        {"prompt": "p2", "context": "", "reply": "r2"},
    ]
    path = tmp_path / f"data.{fmt}"
    frame = datasets.Dataset.from_list(rows)
    if fmt == "jsonl":
        frame.to_json(str(path), lines=True)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        frame.to_csv(str(path), index=False)
    else:
        frame.to_parquet(str(path))
    cfg = DataConfig(
        path=str(path),
        instruction_field="prompt",
        input_field="context",
        output_field="reply",
        label_field="",
    )
    ds = load_records(cfg).dataset
    assert ds["instruction"] == ["p1", "p2"]
    assert ds["input"] == ["c1", ""]
    assert ds["output"] == ["r1", "r2"]


def test_rows_with_empty_fields_are_dropped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [{"q": "a", "r": "b"}, {"q": "", "r": "b"}, {"q": "c", "r": None}, {"q": "d", "r": "e"}]
    path.write_text("\n".join(json.dumps(r) for r in lines))
    loaded = load_records(
        DataConfig(path=str(path), instruction_field="q", output_field="r", label_field="")
    )
    assert loaded.dataset["instruction"] == ["a", "d"]
    assert loaded.dropped_empty == 2


def test_missing_file_and_column_name_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        load_records(DataConfig(path=str(tmp_path / "none.jsonl")))
    with pytest.raises(DataError, match=r"column 'questionz'.*columns: id, source"):
        load_records(DataConfig(instruction_field="questionz"))
    odd = tmp_path / "data.txt"
    odd.write_text("x")
    with pytest.raises(DataError, match=r"set data\.format"):
        load_records(DataConfig(path=str(odd)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "a", "answer": \n')
    with pytest.raises(DataError, match="could not read"):
        load_records(DataConfig(path=str(broken), label_field=""))


def test_split_is_deterministic_by_seed() -> None:
    ds = load_records(MEDQUAD).dataset
    cfg = PartitionConfig(clients=4, alpha=0.5)
    a = split_dataset(ds, MEDQUAD, cfg, seed=1)
    b = split_dataset(ds, MEDQUAD, cfg, seed=1)
    c = split_dataset(ds, MEDQUAD, cfg, seed=2)
    assert a.eval["instruction"] == b.eval["instruction"]
    assert [p["instruction"] for p in a.clients] == [p["instruction"] for p in b.clients]
    assert [p["instruction"] for p in a.clients] != [p["instruction"] for p in c.clients]
    eval_set = set(zip(a.eval["instruction"], a.eval["output"], strict=True))
    seen: set[tuple[str, str]] = set()
    for part in a.clients:
        texts = set(zip(part["instruction"], part["output"], strict=True))
        assert not texts & eval_set, "a client holds an eval record"
        assert not texts & seen, "two clients hold the same record"
        seen |= texts
    assert len(seen) + len(eval_set) == len(ds)


def _skew(parts: list[datasets.Dataset]) -> float:
    """Mean share of each client's most common label (1.0 = one label per client)."""
    return sum(Counter(p["label"]).most_common(1)[0][1] / len(p) for p in parts) / len(parts)


def test_dirichlet_skews_labels_more_as_alpha_falls() -> None:
    ds = load_records(MEDQUAD).dataset
    iid = split_dataset(ds, MEDQUAD, PartitionConfig(clients=4, method="iid"), seed=0)
    mild = split_dataset(ds, MEDQUAD, PartitionConfig(clients=4, alpha=100.0), seed=0)
    strong = split_dataset(ds, MEDQUAD, PartitionConfig(clients=4, alpha=0.1), seed=0)
    assert _skew(strong.clients) > _skew(mild.clients) + 0.2
    assert _skew(iid.clients) < 0.3
    assert [s["size"] for s in iid.stats()] == [116, 116, 116, 116]


def test_few_shot_cap() -> None:
    ds = load_records(MEDQUAD).dataset
    split = split_dataset(
        ds, MEDQUAD, PartitionConfig(clients=3, max_examples_per_client=20), seed=0
    )
    assert all(len(p) == 20 for p in split.clients)
    stats = split.stats()
    assert sum(stats[0]["labels"].values()) == 20  # type: ignore[union-attr]


def test_more_clients_than_records() -> None:
    data = DataConfig(eval_size=2)
    with pytest.raises(DataError, match=r"lower data\.eval_size or partition\.clients"):
        split_dataset(_records(5), data, PartitionConfig(clients=4, method="iid"), seed=0)


def test_impossible_dirichlet_partition_is_a_data_error() -> None:
    data = DataConfig(eval_size=2)
    cfg = PartitionConfig(clients=10, alpha=0.01, min_partition_size=5)
    with pytest.raises(DataError, match="could not partition"):
        split_dataset(_records(40), data, cfg, seed=0)


def test_empty_partition_is_a_data_error() -> None:
    # min_partition_size = 0 lets a strongly skewed Dirichlet split leave a client with nothing.
    cfg = PartitionConfig(clients=10, alpha=0.01, min_partition_size=0)
    with pytest.raises(DataError, match=r"client \d+ received no records"):
        split_dataset(_records(40), DataConfig(eval_size=2), cfg, seed=0)


def _malformed(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    rows = [
        json.dumps({"q": "fine", "r": "yes"}).encode(),
        b'{"q": "caf\xe9", "r": "latin-1, not UTF-8"}',
        b'{"q": "cut off", "r": ',
        b'["a", "list"]',
        json.dumps({"q": "no answer"}).encode(),
        b"",
        json.dumps({"q": "also fine", "r": "ok", "extra": 3}).encode(),
    ]
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


def test_malformed_rows_are_skipped_and_counted_by_reason(tmp_path: Path) -> None:
    cfg = DataConfig(path=str(_malformed(tmp_path)), instruction_field="q", output_field="r")
    loaded = load_records(dataclasses.replace(cfg, label_field=""))
    assert loaded.dataset["instruction"] == ["fine", "also fine"]
    assert loaded.source_rows == 6
    assert loaded.dropped == {
        "not UTF-8": 1,
        "not valid JSON": 1,
        "not a JSON object": 1,
        "empty instruction or output": 1,
    }
    assert loaded.describe_dropped().startswith("4 dropped (")


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        (slice(0, 2), "line 2: not UTF-8"),
        (slice(2, 3), "line 1: not valid JSON"),
        (slice(3, 4), "line 1: not a JSON object"),
        (slice(4, 5), "line 1: empty instruction or output"),
    ],
)
def test_malformed_rows_can_be_rejected_with_their_line(
    tmp_path: Path, keep: slice, message: str
) -> None:
    lines = _malformed(tmp_path).read_bytes().split(b"\n")[keep]
    if keep.start:  # the bad row alone would leave nothing: put a good one after it
        lines.append(json.dumps({"q": "fine", "r": "yes"}).encode())
    path = tmp_path / "one.jsonl"
    path.write_bytes(b"\n".join(lines))
    cfg = DataConfig(path=str(path), instruction_field="q", output_field="r", label_field="")
    expected = rf"one\.jsonl {message}; fix the row or set data\.bad_rows"
    with pytest.raises(DataError, match=expected):
        load_records(dataclasses.replace(cfg, bad_rows="fail"))


def test_csv_lines_that_are_not_utf8_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"q,r\na,b\ncaf\xe9,x\nc,d\n")
    cfg = DataConfig(path=str(path), instruction_field="q", output_field="r", label_field="")
    loaded = load_records(cfg)
    assert loaded.dataset["instruction"] == ["a", "c"] and loaded.dropped == {"not UTF-8": 1}
    with pytest.raises(DataError, match=r"d\.csv line 3: not UTF-8"):
        load_records(dataclasses.replace(cfg, bad_rows="fail"))
