"""Agreeing on failure: a store-backed board of the failures of each refit.

Every rank of a refit generation (trainer ranks, engine ranks) and the driver share the
refit's TCPStore. A rank that fails posts a `Failure` (its refit rank, role, phase, error)
under the refit's version; so does the driver when a side times out or a rank process dies.
While a refit runs, every rank's waits poll the board (`FailureBoard.interrupt`, a few times
a second, one store round trip) and their own deadline: as soon as any failure is posted, or
the deadline passes, every rank stops and raises `RefitFailed` listing every failure posted
so far, so no rank hangs in a collective that will never complete.

Commit. A rank that finished its part does not return yet: it counts itself done and waits
for the refit's *outcome*, a key set once, atomically: to ``ok`` by the last rank to finish,
or to ``failed`` by the first failure posted. So every rank, including those whose own part
succeeded, returns or raises together.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from refit.errors import RefitError

__all__ = ["Failure", "FailureBoard", "RefitFailed"]

POLL_S = 0.02


@dataclass(frozen=True)
class Failure:
    rank: int  # refit rank; -1 for the driver
    role: str  # "trainer", "engine" or "driver"
    phase: str
    message: str

    def describe(self) -> str:
        who = "the driver" if self.rank < 0 else f"{self.role} rank {self.rank}"
        return f"{who} failed in {self.phase}: {self.message}"


class RefitFailed(RefitError):
    """A refit stopped because a rank failed or a deadline passed."""

    def __init__(self, version: int, failures: list[Failure], *, note: str = "") -> None:
        self.version = version
        self.failures = failures
        head = f"refit {version} failed" + (f" ({note})" if note else "")
        super().__init__([head, *[f.describe() for f in failures]])


class FailureBoard:
    def __init__(self, store: Any, prefix: str) -> None:
        self.store = store
        self.prefix = prefix

    def _key(self, version: int, what: str) -> str:
        return f"{self.prefix}/failures/v{version}/{what}"

    def post(self, version: int, failure: Failure) -> None:
        i = int(self.store.add(self._key(version, "n"), 1))
        self.store.set(self._key(version, str(i)), pickle.dumps(failure))
        self.store.compare_set(self._key(version, "outcome"), "", "failed")

    def commit(self, version: int, world: int, deadline: float, me: Failure) -> None:
        """Count this rank done; return when all `world` ranks are, raise `RefitFailed` if
        any failure is posted first or `deadline` (monotonic) passes."""
        import datetime

        outcome = self._key(version, "outcome")
        if int(self.store.add(self._key(version, "done"), 1)) == world:
            self.store.compare_set(outcome, "", "ok")
        left = max(0.001, deadline - time.monotonic())
        try:
            self.store.wait([outcome], datetime.timedelta(seconds=left))
        except Exception:  # the store's own timeout
            self.post(
                version, Failure(me.rank, me.role, "commit", "timed out waiting for its peers")
            )
        if self.store.get(outcome) != b"ok":
            raise RefitFailed(version, self.read(version))

    def count(self, version: int) -> int:
        return int(self.store.add(self._key(version, "n"), 0))

    def read(self, version: int) -> list[Failure]:
        return [
            pickle.loads(self.store.get(self._key(version, str(i))))
            for i in range(1, self.count(version) + 1)
        ]

    def interrupt(
        self, version: int, deadline: float, me: Failure, phase: Callable[[], str]
    ) -> Callable[[], None]:
        """An ``interrupt`` for `xfer.TorchComm`: raises `RefitFailed` once a failure is posted
        for `version` or, after posting its own, once `deadline` (monotonic) has passed."""
        next_check = 0.0

        def check() -> None:
            nonlocal next_check
            now = time.monotonic()
            if now < next_check:
                return
            next_check = now + POLL_S
            if now > deadline:
                self.post(
                    version,
                    Failure(me.rank, me.role, phase(), "timed out waiting for its peers"),
                )
                raise RefitFailed(version, self.read(version), note="deadline passed")
            if self.count(version):
                raise RefitFailed(version, self.read(version))

        return check
