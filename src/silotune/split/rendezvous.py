"""A meeting point for the clients of a split server: everyone present deposits, one result.

Used to average adapters (the clients' front/back adapters at a round's end, the per-client
middle adapters every K steps). A client that never arrives cannot wedge the others: after
`timeout_s` the meeting closes with whoever came.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Rendezvous(Generic[T, R]):
    """Collects one value per member, then hands every member `combine(values)`."""

    def __init__(self, combine: Callable[[dict[str, T]], R], timeout_s: float) -> None:
        self._combine = combine
        self._timeout_s = timeout_s
        self._cond = threading.Condition()
        self._deposits: dict[str, T] = {}
        self._generation = 0
        self._results: dict[int, R | BaseException] = {}

    def meet(self, member: str, value: T, members: Callable[[], set[str]]) -> R:
        """Deposit `value` and wait until every current member did (or the timeout passed)."""
        with self._cond:
            generation = self._generation
            self._deposits[member] = value
            self._close_if_complete(members())
            deadline = time.monotonic() + self._timeout_s
            while self._generation == generation:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._close()
                    break
                self._cond.wait(remaining)
            result = self._results[generation]
        if isinstance(result, BaseException):
            raise result
        return result

    def recheck(self, members: set[str]) -> None:
        """Close the open meeting if a member leaving made it complete."""
        with self._cond:
            self._close_if_complete(members)

    def _close_if_complete(self, members: set[str]) -> None:
        if self._deposits and members <= set(self._deposits):
            self._close()

    def _close(self) -> None:
        # Whatever combine does, this meeting ends here: its deposits are never reused, and a
        # failure reaches every member rather than the one whose thread ran it.
        try:
            self._results[self._generation] = self._combine(dict(self._deposits))
        except Exception as exc:
            self._results[self._generation] = exc
        self._results.pop(self._generation - 2, None)  # nobody waits on older meetings
        self._deposits.clear()
        self._generation += 1
        self._cond.notify_all()
