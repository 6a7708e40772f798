"""One supervisor for the processes silotune starts, so that none outlives the command.

`silotune run` (split server and clients) and `silotune deploy local` (SuperLink, SuperNodes)
start their children here. Each child runs under a small watchdog, `python -m silotune.procs`,
which leads a process group of its own; the child and what it starts stay in that group, except
what detaches itself (Flower's SuperLink starts its SuperExec in a new session):

    silotune run ──┬── watchdog ── silotune split-server                  group A
                   └── watchdog ── flower-superlink                       group B
                                          └── flower-superexec ── app     (own session)

Stopping (normal exit, an exception, SIGINT/SIGTERM/SIGHUP turned into `Stopped`) sends SIGTERM
to every group and to every descendant found by walking the process tree (which reaches the
detached ones), waits a grace period, SIGKILLs what is left, and deletes the temporary key
folders. If the parent dies without doing this (SIGKILL, out of memory), each watchdog sees its
parent change (polled; PR_SET_PDEATHSIG would reach only the direct child, and fires when the
forking thread ends rather than the process) and does the same for its own tree.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, TracebackType

import psutil
from rich.console import Console
from rich.text import Text

from silotune.disk import on_full_disk
from silotune.errors import UserError

_POLL_S = 0.5  # how quickly an orphaned watchdog notices that its parent is gone
_GRACE_S = 8.0  # SIGTERM to SIGKILL: a split server saves its adapter; all gone within 10 s
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like SIGINT so every `except KeyboardInterrupt` saves its work."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, _frame: FrameType | None) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within: SIGTERM and SIGHUP interrupt the main thread as Ctrl-C does (call it there)."""
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal number, the shell's convention (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + (exc.signum if isinstance(exc, Stopped) else signal.SIGINT)


def run_command(body: Callable[[], int], after_full_disk: str) -> int:
    """A silotune process's main body, with its conventions: SIGTERM and SIGHUP stop it as
    Ctrl-C does, a full disk says how to go on, a user's mistake is one line on stderr and exit
    code 2, a stop exits with 128 + the signal's number."""
    try:
        with signals_interrupt(), on_full_disk(after_full_disk):
            return body()
    except UserError as exc:
        message = Text.assemble(("error: ", "bold red"), str(exc))
        Console(stderr=True).print(message, soft_wrap=True, highlight=False)
        return 2
    except KeyboardInterrupt as exc:
        Console(stderr=True).print(f"stopped ({exc if isinstance(exc, Stopped) else 'SIGINT'})")
        return exit_code(exc)


class Supervisor:
    """Starts named child processes and temporary folders; `close` stops and deletes them all."""

    def __init__(self, grace_s: float = _GRACE_S) -> None:
        self.grace_s = grace_s
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._temp: list[Path] = []

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def temp_dir(self, prefix: str) -> Path:
        """A private temporary folder (keys, certificates) deleted with the children."""
        path = Path(tempfile.mkdtemp(prefix=prefix))
        self._temp.append(path)
        return path

    def start(
        self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `argv` under a watchdog in its own session, output into `log`."""
        watchdog = [sys.executable, "-m", "silotune.procs", str(os.getpid()), *map(str, self._temp)]
        with log.open("wb") as fh:  # the child keeps its own handle
            proc = subprocess.Popen(
                [*watchdog, "--", *argv],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.processes[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL process `name` and everything it started, as a crash would."""
        proc = self.processes[name]
        _send(_descendants([proc.pid]), [proc.pid], signal.SIGKILL)
        proc.wait()

    def close(self) -> None:
        """Stop every child, then delete the temporary folders."""
        # A second Ctrl-C must not cut this short and leave children or keys behind.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self._stop()
        finally:
            for path in self._temp:
                shutil.rmtree(path, ignore_errors=True)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _stop(self) -> None:
        watchdogs = [proc.pid for proc in self.processes.values()]
        _stop_trees(watchdogs, watchdogs, self.grace_s)
        for proc in self.processes.values():
            proc.wait()


def _stop_trees(roots: list[int], groups: list[int], grace_s: float) -> None:
    """SIGTERM the roots' descendants and `groups`; SIGKILL what is left after `grace_s`."""
    tree = _descendants(roots)
    _send(tree, groups, signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    _send(alive + _descendants([p.pid for p in alive]), groups, signal.SIGKILL)


def _descendants(pids: list[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found += psutil.Process(pid).children(recursive=True)
    return found


def _send(procs: list[psutil.Process], groups: list[int], sig: int) -> None:
    for proc in procs:  # psutil checks that the pid still names the process it found
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) not in groups:  # one signal each: a second would cut saving
                proc.send_signal(sig)
    for group in groups:  # a watchdog's pid is its group's id, even after it has exited
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)


def _ignore(_signum: int, _frame: FrameType | None) -> None:
    """The watchdog outlives the signals its group gets, to report the child's exit code."""


def _watch(parent: int, cleanup: list[Path], argv: list[str]) -> int:
    """Run `argv`; if `parent` dies first, stop the whole group and delete `cleanup`."""
    child = subprocess.Popen(argv)
    for sig in STOP_SIGNALS:  # after Popen: the child must get the default handlers
        signal.signal(sig, _ignore)
    while True:
        try:
            code = child.wait(timeout=_POLL_S)
            return code if code >= 0 else 128 - code
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:
                break
    _stop_trees([os.getpid()], [], _GRACE_S)  # not this watchdog's group yet: it cleans up first
    for path in cleanup:
        shutil.rmtree(path, ignore_errors=True)
    os.killpg(0, signal.SIGKILL)  # the rest of the group, and this watchdog with it
    return 1


if __name__ == "__main__":
    _parent, *_rest = sys.argv[1:]
    _split = _rest.index("--")
    sys.exit(_watch(int(_parent), [Path(p) for p in _rest[:_split]], _rest[_split + 1 :]))
