"""`Pending` implementations: work running in a thread, and several pendings joined."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from refit.errors import RefitError
from refit.spec import Pending

__all__ = ["Threaded", "wait_all"]

_POOL = ThreadPoolExecutor(max_workers=32, thread_name_prefix="refit")


class Threaded:
    """Runs ``fn()`` in a thread; `wait` returns its result as a list (one per rank)."""

    def __init__(self, fn: Callable[[], Any], *, what: str) -> None:
        self.what = what
        self._future: Future[Any] = _POOL.submit(fn)

    def wait(self, timeout: float | None = None) -> list[Any]:
        try:
            out = self._future.result(timeout=timeout)
        except FutureTimeout:
            raise RefitError(f"{self.what} did not finish within {timeout} s") from None
        return list(out) if isinstance(out, list | tuple) else [out]


def wait_all(pendings: Sequence[Pending], timeout: float | None = None) -> list[list[Any]]:
    """Wait for every pending; if any fails, wait for the rest and raise one error naming
    every failure."""
    results: list[list[Any]] = []
    failures: list[str] = []
    for p in pendings:
        try:
            results.append(p.wait(timeout))
        except Exception as e:  # collect every side's failure
            results.append([])
            failures.append(f"{getattr(p, 'what', type(p).__name__)}: {type(e).__name__}: {e}")
    if failures:
        raise RefitError(failures)
    return results
