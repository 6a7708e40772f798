"""Progress you can watch: workers' ticks reach the runner's display, screened and throttled;
many clients are summarised."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import datasets
from rich.console import Console
from rich.progress import Progress

from silotune import progress
from silotune.data.partition import Partitions
from silotune.report.terminal import clients_table


def _watch(root: Path) -> tuple[progress.Watcher, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=100)  # not a terminal: one line per event
    return progress.Watcher(root, Progress(console=console), console), out


def test_a_workers_ticks_become_lines_and_the_files_go_at_the_end(tmp_path: Path) -> None:
    folder = tmp_path / progress.PROGRESS_DIR
    watcher, out = _watch(tmp_path)
    with watcher:
        with progress.reporting(folder, "client 2"):
            for step in range(1, 7):
                progress.tick("training", step, 6)
            progress.tick("held-out loss", 12, 12)
        progress.tick("training", 1, 6)  # outside `reporting`: nowhere
        watcher.drain()
        lines = out.getvalue().splitlines()
    # The first tick, the last (throttled in between), and each new kind of work.
    assert [line.strip() for line in lines] == [
        "client 2: training 1/6",
        "client 2: training 6/6",
        "client 2: held-out loss 12/12",
    ]
    assert not folder.exists()


def test_a_silent_stretch_still_prints_the_last_thing_done_and_its_age(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(progress, "_QUIET_S", 0.6)
    watcher, out = _watch(tmp_path)
    with watcher:
        with progress.reporting(tmp_path / progress.PROGRESS_DIR, "runner"):
            progress.tick("starting Flower's simulation", 0, 1)
            time.sleep(4)  # a long step that ticks nothing (Ray starting)
        lines = [line.strip() for line in out.getvalue().splitlines()]
    assert lines[0] == "runner: starting Flower's simulation 0/1"
    again = [line for line in lines[1:] if line.startswith("runner: starting Flower's")]
    assert len(again) >= 2, lines  # one every _QUIET_S of silence, with the event's age
    assert all(line.endswith(" s ago)") for line in again)


def test_hostile_or_half_written_lines_are_skipped(tmp_path: Path) -> None:
    folder = tmp_path / progress.PROGRESS_DIR
    folder.mkdir()
    file = folder / "client-0.jsonl"
    watcher, out = _watch(tmp_path)
    with watcher:
        good = {"who": "client 0", "what": "training", "done": 1, "total": 3}
        bad = [
            "not json",
            json.dumps([1, 2]),
            json.dumps({**good, "done": "1"}),
            json.dumps({**good, "total": 2.5}),
            json.dumps({**good, "who": None}),
            json.dumps({**good, "what": "[red]markup[/]", "done": 2}),
        ]
        file.write_text("\n".join(bad) + "\n" + json.dumps(good)[:20])  # the last: unfinished
        watcher.drain()
        assert [line.strip() for line in out.getvalue().splitlines()] == [
            "client 0: [red]markup[/] 2/3"
        ]
        with file.open("a") as more:
            more.write(json.dumps(good)[20:] + "\n")
        time.sleep(0.01)
        watcher.drain()
    assert out.getvalue().splitlines()[-1].strip() == "client 0: training 1/3"


def test_an_interrupted_runs_old_ticks_are_not_shown_again(tmp_path: Path) -> None:
    folder = tmp_path / progress.PROGRESS_DIR
    with progress.reporting(folder, "runner"):
        progress.tick("training", 3, 3)
    watcher, out = _watch(tmp_path)
    with watcher:
        watcher.drain()
    assert out.getvalue() == ""


def test_a_hundred_clients_get_a_summary_not_a_hundred_rows() -> None:
    def part(size: int, top: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"label": ["a"] * top + ["b"] * (size - top)})

    split = Partitions(
        clients=[part(10 + i % 5, 5) for i in range(100)], eval=part(4, 2), client_evals=[]
    )
    out = io.StringIO()
    Console(file=out, width=100).print(clients_table(split))
    text = out.getvalue()
    assert "100 clients" in text and "partitions/stats.json" in text
    assert len(text.splitlines()) < 12
    assert "10" in text and "14" in text and "50%" in text  # min and max records, top share
