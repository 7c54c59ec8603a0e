"""`Pending` implementations: work running in a thread, and several pendings joined."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor
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


def wait_all(
    pendings: Sequence[Pending],
    timeout: float | None = None,
    *,
    on_failure: Callable[[str], None] | None = None,
    grace: float = 2.0,
) -> list[list[Any]]:
    """Wait for every pending at once. On the first failure (or when `timeout` passes),
    call ``on_failure(description)`` (so the ranks can stop), give the others `grace`
    seconds to return (ranks stop within a fraction of a second once a failure is posted; one
    that does not is stalled or dead), and raise one error naming every failure."""
    futures = [_POOL.submit(p.wait, timeout) for p in pendings]
    names = [getattr(p, "what", type(p).__name__) for p in pendings]
    done, _ = concurrent.futures.wait(futures, timeout=timeout, return_when=FIRST_EXCEPTION)
    failed = [f for f in done if f.exception() is not None]
    if not failed and len(done) == len(futures):
        return [f.result() for f in futures]
    if failed:
        exc = failed[0].exception()
        first = f"{names[futures.index(failed[0])]}: {type(exc).__name__}: {exc}"
    else:
        late = [n for n, f in zip(names, futures, strict=True) if not f.done()]
        first = f"{late} did not finish within {timeout} s"
    if on_failure is not None:
        on_failure(first)
    concurrent.futures.wait(futures, timeout=grace)
    problems = []
    for name, f in zip(names, futures, strict=True):
        if not f.done():
            problems.append(f"{name}: still running {grace} s after the failure")
        elif f.exception() is not None:
            problems.append(f"{name}: {type(f.exception()).__name__}: {f.exception()}")
    raise RefitError(problems or [first])
