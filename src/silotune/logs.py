"""Where log records go. The terminal shows silotune's own messages and third-party errors;
what libraries log below that (bitsandbytes' kernel notices, Python warnings, ...) goes to the
run's log file, `silotune.log` in its folder. `--verbose` shows everything in the terminal."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOG_FILE = "silotune.log"
_PENDING = 5000  # records kept until a run's log file is known (the rest of a long start is lost)
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Router(logging.Handler):
    """The root logger's one handler: every record to the log file (kept in memory until there
    is one); to the terminal only what a user can act on."""

    def __init__(self, verbose: bool) -> None:
        super().__init__(logging.DEBUG)
        self.verbose = verbose
        self.terminal = _TerminalFormat()
        self.files: list[logging.Handler] = []  # a stack: nested runs log to the innermost
        self.pending: deque[logging.LogRecord] = deque(maxlen=_PENDING)

    def emit(self, record: logging.LogRecord) -> None:
        if self.verbose or _ours(record) or record.levelno >= logging.ERROR:
            try:  # whatever sys.stderr is now (a test, or a tool, may have replaced it)
                sys.stderr.write(self.terminal.format(record) + "\n")
            except Exception:
                self.handleError(record)
        if self.files:
            self.files[-1].handle(record)
        else:
            self.pending.append(record)


class _TerminalFormat(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if _ours(record):
            return f"{self.formatTime(record, '%H:%M:%S')} {record.getMessage()}"
        return f"{record.levelname.lower()} ({record.name}): {record.getMessage()}"


def _ours(record: logging.LogRecord) -> bool:
    return record.name == "silotune" or record.name.startswith("silotune.")


def install(verbose: bool = False, flower: bool = True) -> None:
    """Route this process's log records; call before the libraries are imported, so that one
    that configures logging on import (Opacus calls basicConfig) finds it configured.
    `flower`: also Flower's logger (a process that never runs Flower need not load it)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _Router):
            root.removeHandler(handler)
    root.addHandler(_Router(verbose))
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("silotune").setLevel(logging.INFO)
    # Python warnings become records of "py.warnings". Off first: after an earlier install
    # whose showwarning was since replaced (warnings.catch_warnings), on alone does nothing.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    if not verbose:
        _quiet_libraries(flower)


@contextmanager
def to_file(folder: Path) -> Iterator[Path]:
    """Log to `folder`/silotune.log (appended: a resumed run keeps its history) while the
    block runs, starting with what was logged before the file was known."""
    router = _router()
    path = folder / LOG_FILE
    if router is None:
        yield path
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    while router.pending:
        handler.handle(router.pending.popleft())
    router.files.append(handler)
    try:
        yield path
    finally:
        router.files.remove(handler)
        handler.close()


def _router() -> _Router | None:
    return next((h for h in logging.getLogger().handlers if isinstance(h, _Router)), None)


def _quiet_libraries(flower: bool) -> None:
    """Keep library chatter (progress bars, Ray's log forwarding) out of the results."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    # transformers keeps its own handler on stderr: hand its records to the root instead.
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.set_verbosity_warning()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    import datasets

    datasets.disable_progress_bars()
    if flower:
        from flwr.common.logger import LOGGER_NAME

        adopt(LOGGER_NAME)


def adopt(name: str) -> None:
    """Route the records of a library that prints through its own handlers (Flower, MLflow)
    like every other library's; call after importing it."""
    router = _router()
    if router is None or router.verbose:
        return
    library = logging.getLogger(name)
    for handler in list(library.handlers):
        library.removeHandler(handler)
    library.setLevel(logging.WARNING)
    library.propagate = True
