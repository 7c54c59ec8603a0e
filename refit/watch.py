"""Agreeing on failure and on success: a board of authenticated records in the refit's store.

Every rank of a refit generation (trainer ranks, engine ranks) and the driver share the
refit's TCPStore and a per-refit secret (`token`, made by the driver and handed to the ranks
over the trusted control channel: Ray, ``collective_rpc``, vLLM's API). Everything the board
writes is a JSON record sealed with the token (`xfer.wire.seal`, HMAC-SHA256 bound to its
key); everything it reads is checked. A record that is not JSON, not authentic, or missing is
ignored and counted in `FailureBoard.ignored` (never unpickled, never trusted), so whoever can
reach the store can at worst delay a refit until its deadline, not fake its outcome.

Failures. A rank that fails posts a `Failure` (its refit rank, role, phase, error) under the
refit's version: it bumps the version's counter, then writes record ``n``. While a refit runs,
every rank's waits poll the board (`interrupt`: one counter read every `POLL_S`) and their own
deadline; once an authentic failure is posted, or the deadline passes, every rank stops and
raises `RefitFailed` listing every failure posted so far. Reads never block: a record whose
writer died between counter and record is simply not there yet.

Commit. A rank that finished its part writes its own sealed ``done`` record, counts itself
done, and waits for the refit's *outcome*: once the count reaches the number of ranks, the
rank that sees it checks that every rank's ``done`` record is there and authentic and then
writes the sealed outcome ``ok`` under a key name derived from the token (so nobody can
occupy it first); an authentic failure record means the refit failed. A waiting rank looks
again after 0.5 ms, then after twice as long each time up to `commit_poll_s(world)`: 2 ms
for up to 8 ranks, growing with the world to `POLL_S` (20 ms) at 80 ranks and more. Up to 80
ranks the store then answers at most ~4 polls per ms (a poll is three requests); beyond, one
poll per waiting rank every `POLL_S`. A rank that waited long sees the outcome at most one
cap late. So every rank, including those whose own part succeeded, returns or raises
together, within the deadline.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from refit.errors import RefitError
from xfer.wire import WireError, as_int, as_str, seal, unseal

__all__ = ["Failure", "FailureBoard", "RefitFailed", "commit_poll_s"]

POLL_S = 0.02
COMMIT_FIRST_POLL_S = 0.0005  # a committing rank's first pause; it doubles up to the cap
COMMIT_POLL_PER_RANK_S = 0.00025  # the cap per rank of the world (between 2 ms and POLL_S)
MAX_RECORDS = 4096  # failure records read per refit (a hostile counter cannot make it more)


def commit_poll_s(world: int) -> float:
    """The longest pause between a committing rank's looks at the outcome, for `world`
    ranks: few ranks look often, many ranks no more often than the store can answer."""
    return min(POLL_S, max(0.002, world * COMMIT_POLL_PER_RANK_S))


@dataclass(frozen=True)
class Failure:
    rank: int  # refit rank; -1 for the driver
    role: str  # "trainer", "engine" or "driver"
    phase: str
    message: str

    def describe(self) -> str:
        who = "the driver" if self.rank < 0 else f"{self.role} rank {self.rank}"
        return f"{who} failed in {self.phase}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "role": self.role, "phase": self.phase, "message": self.message}

    @classmethod
    def from_json(cls, x: Any) -> Failure:
        if not isinstance(x, dict):
            raise WireError("failure record: expected an object")
        return cls(
            as_int(x.get("rank"), "failure rank", lo=-1),
            as_str(x.get("role"), "failure role"),
            as_str(x.get("phase"), "failure phase"),
            as_str(x.get("message"), "failure message"),
        )


class RefitFailed(RefitError):
    """A refit stopped because a rank failed or a deadline passed."""

    def __init__(self, version: int, failures: list[Failure], *, note: str = "") -> None:
        self.version = version
        self.failures = list(failures)
        self.note = note
        head = f"refit {version} failed" + (f" ({note})" if note else "")
        super().__init__([head, *[f.describe() for f in failures]])

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_failed, (self.version, self.failures, self.note))


def _rebuild_failed(version: int, failures: list[Failure], note: str) -> RefitFailed:
    return RefitFailed(version, failures, note=note)


_MISSING = object()
_FORGED = object()


class FailureBoard:
    def __init__(self, store: Any, prefix: str, token: bytes) -> None:
        self.store = store
        self.prefix = prefix
        self.token = token
        self.ignored: list[str] = []  # records read but not trusted, for reports

    def _key(self, version: int, what: str) -> str:
        return f"{self.prefix}/v{version}/{what}"

    def _get(self, key: str) -> Any:
        """The authentic value at `key`; `_MISSING` if there is none yet (or the store cannot
        be read); `_FORGED` if what is there is not authentic (ignored, and remembered in
        `ignored`)."""
        try:
            if not self.store.check([key]):
                return _MISSING
            raw = self.store.get(key)
        except (RuntimeError, OSError):  # DistStoreError / DistNetworkError: read again later
            return _MISSING
        return self._open(key, raw)

    def _open(self, key: str, raw: bytes) -> Any:
        """The authentic value in `raw`, read at `key`, or `_FORGED`."""
        try:
            return unseal(raw, self.token, key)
        except WireError as e:
            if str(e) not in self.ignored:
                self.ignored.append(str(e))
            return _FORGED

    # -- failures ------------------------------------------------------------------------------
    def post(self, version: int, failure: Failure) -> None:
        i = int(self.store.add(self._key(version, "n"), 1))
        key = self._key(version, f"failure{i}")
        self.store.set(key, seal(failure.to_json(), self.token, key))

    def count(self, version: int) -> int:
        try:
            return int(self.store.add(self._key(version, "n"), 0))
        except (RuntimeError, OSError):
            return 0

    def read(self, version: int) -> list[Failure]:
        """Every authentic failure posted for `version` so far (never blocks)."""
        return self._scan(version)[0]

    def _scan(self, version: int) -> tuple[list[Failure], bool]:
        """(authentic failures, whether every counted record has been written). At most
        `MAX_RECORDS` are looked at, whatever the counter says."""
        out, complete = [], True
        for i in range(1, min(self.count(version), MAX_RECORDS) + 1):
            rec = self._get(self._key(version, f"failure{i}"))
            if rec is _MISSING:
                complete = False
            elif rec is not _FORGED:
                try:
                    out.append(Failure.from_json(rec))
                except WireError as e:
                    self.ignored.append(str(e))
        return out, complete

    # -- success ------------------------------------------------------------------------------
    def _outcome_key(self, version: int) -> str:
        # a name only token holders can compute: nobody can occupy it before the ranks do
        tag = hmac.new(self.token, f"outcome {version}".encode(), hashlib.sha256).hexdigest()
        return self._key(version, f"outcome-{tag[:32]}")

    def _outcome_ok(self, version: int) -> bool:
        return self._get(self._outcome_key(version)) == "ok"

    def _all_done(self, version: int, world: int) -> bool:
        keys = [self._key(version, f"done{r}") for r in range(world)]
        try:
            if not self.store.check(keys):
                return False
            raws = self.store.multi_get(keys)  # one round trip, not one per rank
        except (RuntimeError, OSError):
            return False
        return all(self._open(k, raw) == "done" for k, raw in zip(keys, raws, strict=True))

    def commit(self, version: int, rank: int, world: int, deadline: float, me: Failure) -> None:
        """Count this rank done; return once all `world` ranks are, raise `RefitFailed` if an
        authentic failure is posted first or `deadline` (monotonic) passes.

        The first rank to see the count reach `world` checks every rank's sealed ``done``
        record and seals the outcome; the others read it. A rank that sees the count but no
        authentic outcome (someone overwrote it) checks the records itself, at most once a
        second."""
        done_key = self._key(version, f"done{rank}")
        self.store.set(done_key, seal("done", self.token, done_key))
        counter = self._key(version, "done")
        self.store.add(counter, 1)
        checked, last_check = -1, 0.0
        # ranks finish within moments of each other: look again soon, then less and less
        # often (a rank that waits long costs the store one poll every `cap`)
        pause, cap = COMMIT_FIRST_POLL_S, commit_poll_s(world)
        while True:
            if self.count(version):
                failures = self.read(version)
                if failures:
                    raise RefitFailed(version, failures)
            if self._outcome_ok(version):
                return
            try:
                n = int(self.store.add(counter, 0))
            except (RuntimeError, OSError):
                n = 0
            now = time.monotonic()
            if n >= world and (n != checked or now - last_check > 1.0):
                checked, last_check = n, now
                if self._all_done(version, world):
                    key = self._outcome_key(version)
                    self.store.set(key, seal("ok", self.token, key))
                    return
            if now > deadline:
                self.post(
                    version, Failure(me.rank, me.role, "commit", "timed out waiting for its peers")
                )
                raise RefitFailed(version, self.read(version), note="deadline passed")
            time.sleep(pause)
            pause = min(2 * pause, cap)

    def interrupt(
        self, version: int, deadline: float, me: Failure, phase: Callable[[], str]
    ) -> Callable[[], None]:
        """An ``interrupt`` for `xfer.TorchComm`: raises `RefitFailed` once an authentic
        failure is posted for `version` or, after posting its own, once `deadline`
        (monotonic) has passed."""
        next_check = 0.0
        seen = 0

        def check() -> None:
            nonlocal next_check, seen
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
            n = self.count(version)
            if n > seen:  # something was posted: trust only authentic records
                failures, complete = self._scan(version)
                if failures:
                    raise RefitFailed(version, failures)
                if complete:  # else records not written yet are read again next time
                    seen = n

        return check
