"""The fault campaign's records (`harness.faults`): one `CaseReport` per injected failure, one
record per extra case, all in one `CampaignReport` written as JSON (`harness.reports.write`)
and read back by tests (`harness.reports.read`); `markdown` renders the README's tables."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from refit.spec import EngineStatus

__all__ = [
    "CampaignReport",
    "CaseReport",
    "ConcurrentRefits",
    "DriverKilled",
    "DuplicatedEngine",
    "EngineSeen",
    "ReportedFailure",
    "GenerationRace",
    "HostileStore",
    "ManyFailures",
    "ProcStats",
    "RefusedDelta",
    "StoppedEngine",
    "markdown",
]


@dataclasses.dataclass(frozen=True)
class EngineSeen:
    """The engine after a case, as the campaign saw it: its `status` (`Refitter.status()`;
    None when it could not be asked, `error` says why) and whether it refused to generate."""

    status: EngineStatus | None
    generate_refused: bool = False
    error: str | None = None

    @property
    def alive(self) -> bool:
        return self.status is not None

    @property
    def stale(self) -> bool:
        return self.status is not None and self.status.stale

    @property
    def rolled_back(self) -> bool:
        return self.status is not None and self.status.holds == self.status.version


@dataclasses.dataclass(frozen=True)
class ReportedFailure:
    """One failure the refit reported (rank -1: the driver)."""

    rank: int
    role: str
    phase: str
    message: str


@dataclasses.dataclass(frozen=True)
class CaseReport:
    """An injected failure: did every side raise, how fast, what did the engine hold after,
    and did the next refit recover (generation equal to HF's on the new weights)."""

    case: str
    raised: bool
    seconds_to_raise: float
    status_after: EngineSeen | None  # None for a description case (nothing was sent)
    recovered: bool
    recovery_seconds: float
    status_recovered: EngineSeen
    error: str = ""
    failures: list[ReportedFailure] | None = None  # None: refused at prepare, not a failed refit
    sides_raised: list[str] = dataclasses.field(default_factory=list)
    recovery_error: str = ""

    def row(self) -> str:
        if not self.raised:
            raised = "no (not detected)"
        elif self.failures is None:
            raised = "prepare, before any communication"
        else:
            raised = ", ".join(sorted(set(self.sides_raised))) or "driver"
        if self.failures:
            f = self.failures[0]
            who = "driver" if f.rank < 0 else f"{f.role} rank {f.rank}"
            reported = f"{who} in {f.phase}: {_clean(f.message)[:70]}"
        else:
            lines = self.error.splitlines()
            reported = _clean(lines[1] if len(lines) > 1 else lines[0] if lines else "")[:80]
        st = self.status_after
        if st is None:
            after = "untouched"
        elif st.status is None:
            after = "dead (restarted)"
        else:
            held = (
                "rolled back"
                if st.rolled_back
                else "partly new"
                if st.status.holds is None
                else "holds the new weights"
            )
            after = (
                f"{'stale' if st.stale else 'fresh'}, {held}, "
                f"{'refuses' if st.generate_refused else 'serves'} generate"
            )
        nxt = "recovered, matches HF" if self.recovered else "did not recover"
        return (
            f"| {self.case} | {raised} | {self.seconds_to_raise} | {reported} | {after} | {nxt} |"
        )


@dataclasses.dataclass(frozen=True)
class Extra:
    """A case beyond injected failures: `passed` is its own criterion, `recovered` whether
    the campaign's engine matched HF after it."""

    case: str
    passed: bool
    recovered: bool

    def what(self) -> str:
        raise NotImplementedError

    def row(self) -> str:
        nxt = "recovered, matches HF" if self.recovered else "did not recover"
        return f"| {self.case} | {'yes' if self.passed else 'NO'} | {self.what()} | {nxt} |"


@dataclasses.dataclass(frozen=True)
class DriverKilled(Extra):
    processes: int  # the killed driver's descendants (Ray, trainer ranks, engine)
    left: int  # still alive at the end
    seconds_until_none: float

    def what(self) -> str:
        return (
            f"{self.processes} processes it started; {self.left} left after "
            f"{self.seconds_until_none} s"
        )


@dataclasses.dataclass(frozen=True)
class HostileStore(Extra):
    refit_ok: bool
    error: str
    seconds: float
    ignored_by_ranks: int  # hostile records the ranks ignored and reported
    code_ran: bool  # the pickled record's code ran somewhere

    def what(self) -> str:
        return (
            f"refit {'succeeded' if self.refit_ok else 'failed'} in {self.seconds} s; "
            f"{self.ignored_by_ranks} records ignored and reported by the ranks; code ran: "
            f"{self.code_ran}"
        )


@dataclasses.dataclass(frozen=True)
class StoppedEngine(Extra):
    raised: bool
    seconds_to_raise: float
    error: str
    status_after: EngineSeen

    def what(self) -> str:
        return (
            f"raised in {self.seconds_to_raise} s; engine after: "
            f"{'stale' if self.status_after.stale else 'fresh'}"
        )


@dataclasses.dataclass(frozen=True)
class ConcurrentRefits(Extra):
    outcomes: list[str]  # "ok" or the error, per refit

    def what(self) -> str:
        return "; ".join(_clean(o)[:70] for o in self.outcomes)


@dataclasses.dataclass(frozen=True)
class DuplicatedEngine(Extra):
    raised: bool
    error: str

    def what(self) -> str:
        return _clean(self.error)[:100]


@dataclasses.dataclass(frozen=True)
class GenerationRace(Extra):
    generations: int  # generations that ran during the refit
    each_old_or_new: bool

    def what(self) -> str:
        return (
            f"{self.generations} generations during the refit, each on the old or the new "
            f"weights: {self.each_old_or_new}"
        )


@dataclasses.dataclass(frozen=True)
class RefusedDelta(Extra):
    outcome: str  # "ok" or the error
    resynced: bool
    delta: bool | None
    next_delta: bool

    def what(self) -> str:
        return (
            f"refit {_clean(self.outcome)[:60]}; resynced dense at once: {self.resynced}; "
            f"next refit a delta: {self.next_delta}"
        )


@dataclasses.dataclass(frozen=True)
class ProcStats:
    """Threads, open file descriptors and resident bytes of one process."""

    threads: int
    fds: int
    rss: int
    pid: int


@dataclasses.dataclass(frozen=True)
class ManyFailures(Extra):
    failed: int
    seconds_per_failure: float
    before: dict[str, ProcStats]  # per process, before the failures
    after: dict[str, ProcStats]  # after them and one refit that succeeded
    grown: list[str]  # what leaked: a process whose threads or descriptors grew

    def what(self) -> str:
        def most(k: str) -> int:
            return max(getattr(self.after[p], k) - getattr(self.before[p], k) for p in self.before)

        return (
            f"{self.failed} failed ({self.seconds_per_failure} s each); largest change over "
            f"every process: threads {most('threads'):+d}, fds {most('fds'):+d}, RSS "
            f"{most('rss') / 2**20:+.1f} MiB"
        )


@dataclasses.dataclass
class CampaignReport:
    """Every case of one campaign (filled in as it runs; a case left out by ``--only`` is
    None)."""

    cases: list[CaseReport] = dataclasses.field(default_factory=list)
    driver_killed: DriverKilled | None = None
    hostile_store: HostileStore | None = None
    stopped_engine: StoppedEngine | None = None
    concurrent_refits: ConcurrentRefits | None = None
    duplicated_engine: DuplicatedEngine | None = None
    generation_race: GenerationRace | None = None
    refused_delta: RefusedDelta | None = None
    many_failures: ManyFailures | None = None

    def extras(self) -> list[Extra]:
        return [
            x for f in dataclasses.fields(self) if isinstance(x := getattr(self, f.name), Extra)
        ]

    @property
    def ok(self) -> bool:
        return all(c.raised and c.recovered for c in self.cases) and all(
            x.passed and x.recovered for x in self.extras()
        )


def _clean(text: str) -> str:
    """One line, without gloo's source paths."""
    text = re.sub(r"\[/[^\]]*\] ", "", text)
    return " ".join(text.replace("|", "/").split())


def markdown(report: CampaignReport) -> str:
    rows: list[Any] = [
        "| case | every side raised | seconds to raise | reported as | engine after | next refit |",
        "|---|---|---|---|---|---|",
        *[c.row() for c in report.cases],
        "",
        "| case | passed | what happened | next refit |",
        "|---|---|---|---|",
        *[x.row() for x in report.extras()],
    ]
    return "\n".join(rows)
