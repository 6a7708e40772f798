"""Progress inside a round, from wherever the work runs. A process doing work (the runner, a
simulated client in a Ray worker) `tick`s what it is doing; inside `reporting` the ticks go, at
most about once a second, to a small JSON-lines file per worker in the run folder's progress/.
The runner's `Watcher` follows those files: a live line per worker in a terminal, one line per
event (at most one per worker every few seconds) where output is not a terminal, and when no
worker has said anything for a few seconds, the last thing one did and how long ago; it deletes
progress/ when the run's work is done."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, TaskID

PROGRESS_DIR = "progress"
_EVERY_S = 1.0  # how often a worker writes at most (a finished or new task: always)
_LINE_EVERY_S = 5.0  # without a terminal, how often one worker's progress is printed at most
_QUIET_S = 8.0  # without a terminal, the longest the watcher stays silent while work goes on
_POLL_S = 0.5


@dataclass
class _Beacon:
    path: Path
    who: str
    last: tuple[str, float] = ("", 0.0)  # what was written last, and when

    def write(self, what: str, done: int, total: int) -> None:
        now = time.monotonic()
        if what == self.last[0] and done < total and now - self.last[1] < _EVERY_S:
            return
        self.last = (what, now)
        line = json.dumps({"who": self.who, "what": what, "done": done, "total": total})
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as out:
                out.write(line + "\n")
        except OSError:
            pass  # progress is a courtesy: a full disk or a removed folder never stops the work


_current: list[_Beacon] = []  # process-wide (a Flower server thread ticks too): innermost last


@contextmanager
def reporting(folder: Path, who: str) -> Iterator[None]:
    """While the block runs, this process's ticks are `who`'s, written into `folder` (a run
    folder's progress/)."""
    _current.append(_Beacon(folder / f"{who.replace(' ', '-')}.jsonl", who))
    try:
        yield
    finally:
        _current.pop()


def tick(what: str, done: int, total: int) -> None:
    """`done` of `total` units of `what` (e.g. "training", 3, 6); nothing outside `reporting`."""
    if _current:
        _current[-1].write(what, done, total)


@dataclass
class _Follow:
    offset: int
    printed: dict[str, tuple[str, float]] = field(default_factory=dict)  # who -> (what, when)


class Watcher:
    """Follows a run folder's progress files and shows them in `progress` (a live display) or,
    without a terminal, as lines on `console`. Use as a context manager."""

    def __init__(self, root: Path, progress: Progress, console: Console) -> None:
        self.root = root
        self.progress = progress
        self.console = console
        self.live = console.is_terminal
        self.files: dict[Path, _Follow] = {}
        self.tasks: dict[str, TaskID] = {}
        self.latest: tuple[dict[str, Any], float] | None = None  # the last event, when it came
        self.last_line = time.monotonic()  # without a terminal: when a line was printed last
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def __enter__(self) -> Watcher:
        for path in self._paths():  # what an interrupted run wrote before is not news
            self.files[path] = _Follow(offset=path.stat().st_size)
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()
        self.clear()
        shutil.rmtree(self.root / PROGRESS_DIR, ignore_errors=True)

    def drain(self) -> None:
        """Show what the workers have written so far, now."""
        with self.lock:
            for path in self._paths():
                follow = self.files.setdefault(path, _Follow(offset=0))
                for event in _read(path, follow):
                    self._show(event, follow)

    def clear(self) -> None:
        """Take the workers' lines off the display (an algorithm has finished)."""
        self.drain()
        with self.lock:
            for task in self.tasks.values():
                self.progress.remove_task(task)
            self.tasks.clear()

    def _paths(self) -> list[Path]:
        return sorted(p for p in (self.root / PROGRESS_DIR).glob("*.jsonl") if p.is_file())

    def _loop(self) -> None:
        while not self.stop.wait(_POLL_S):
            self.drain()
            self._still_working()

    def _still_working(self) -> None:
        """Without a terminal, a line at least every _QUIET_S: the last event and its age."""
        now = time.monotonic()
        with self.lock:
            if self.live or self.latest is None or now - self.last_line < _QUIET_S:
                return
            event, when = self.latest
            self.last_line = now
            self.console.print(
                f"    {escape(event['who'][:60])}: {escape(event['what'][:60])} "
                f"{int(event['done'])}/{int(event['total'])} ({now - when:.0f} s ago)",
                highlight=False,
            )

    def _show(self, event: dict[str, Any], follow: _Follow) -> None:
        who, what = escape(event["who"][:60]), escape(event["what"][:60])
        done, total = int(event["done"]), max(int(event["total"]), 1)
        now = time.monotonic()
        self.latest = (event, now)
        if self.live:  # (the caller holds the lock)
            if who not in self.tasks:
                self.tasks[who] = self.progress.add_task(who, total=total)
            description = f"  {who}: {what}"
            self.progress.update(
                self.tasks[who], description=description, completed=done, total=total
            )
            return
        last_what, last_when = follow.printed.get(who, ("", 0.0))
        if what == last_what and done < total and now - last_when < _LINE_EVERY_S:
            return
        follow.printed[who] = (what, now)
        self.last_line = now
        self.console.print(f"    {who}: {what} {done}/{total}", highlight=False)


def _read(path: Path, follow: _Follow) -> list[dict[str, Any]]:
    """The whole lines appended to `path` since the last read (a half-written one waits)."""
    try:
        with path.open("rb") as source:
            source.seek(follow.offset)
            chunk = source.read()
    except OSError:
        return []
    end = chunk.rfind(b"\n") + 1
    follow.offset += end
    events = []
    for raw in chunk[:end].splitlines():
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if _well_formed(event):
            events.append(event)
    return events


def _well_formed(event: object) -> bool:
    """{"who": str, "what": str, "done": int, "total": int}, nothing else is shown."""
    if not isinstance(event, dict):
        return False
    texts = all(isinstance(event.get(k), str) for k in ("who", "what"))
    counts = all(type(event.get(k)) is int for k in ("done", "total"))
    return texts and counts
