"""`Refitter`: the product. ``Refitter(train_worker, vllm_engine).refit()`` every RL step.

`prepare` (run by the first `refit`, or explicitly) asks both sides to describe their
parameters, plans (`plan_refit`, pure), starts a store on this machine, and has every rank
join the refit groups and build its xfer plans. Every `refit` then bumps the version, starts
both sides at once and waits for both; it returns `RefitStats`.

`vllm_engine` may be an `EngineSide`, anything with ``collective_rpc`` (a vLLM ``LLM``
created with the project's worker extension), or a list of either (engine replicas).

Failures: every rank runs a refit against a deadline (`timeout_s`) and a failure board in
the refit's store (`refit.watch`). When a rank fails, a rank process dies, or the deadline
passes, every rank stops within a fraction of a second and `refit` raises `RefitFailed`
naming each failing rank and its phase. The groups of that generation are then dropped; the
next `refit` reconnects every rank (a new generation, same plan, engines keep running). An
engine whose install did not complete keeps, or rolls back to, its previous weights and is
marked stale until a refit completes (`status`). With ``verify=True`` every engine rank also
checks each received shard and misc tensor against checksums from its senders before it
installs anything.

Memory: an engine rank receives the pipeline stages on `streams` workers at once, each with
two receive buffers of at most `bucket_bytes`; `staging_bytes` caps the total (it lowers the
bucket to ``staging_bytes / (2 * streams)``). More streams keep more trainer stages sending
at once: with ``streams >= PP`` every trainer rank sends concurrently.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from refit.errors import RefitError
from refit.pending import wait_all
from refit.planner import DEFAULT_MISC_BUCKET_BYTES, RefitPlan, plan_refit
from refit.rank import RankSetup, RankStats
from refit.rpc import RpcEngine
from refit.spec import EngineSide, TrainerSide
from refit.watch import Failure, FailureBoard, RefitFailed
from xfer import DEFAULT_BUCKET_BYTES, tcp_store
from xfer.api import PATHS, Path

__all__ = ["RefitStats", "Refitter"]


@dataclass(frozen=True)
class RefitStats:
    version: int
    seconds: float
    bulk_bytes: int  # received by all engine ranks
    misc_bytes: int  # broadcast per stage, counted once per stage
    phases: dict[str, float]  # slowest engine rank's phases
    peak_staging_bytes: int  # largest staging held by any rank
    ranks: tuple[RankStats, ...] = field(repr=False)

    @property
    def gbps(self) -> float:
        """Bulk bytes received by the engines per second, in GB/s."""
        return self.bulk_bytes / self.seconds / 1e9 if self.seconds else 0.0

    def summary(self) -> str:
        return (
            f"refit {self.version}: {self.seconds:.3f} s, {self.bulk_bytes / 2**20:.1f} MiB bulk "
            f"+ {self.misc_bytes / 2**20:.2f} MiB misc, {self.gbps:.2f} GB/s, peak staging "
            f"{self.peak_staging_bytes / 2**20:.1f} MiB"
        )


def _engine_sides(engines: Any) -> list[EngineSide]:
    if isinstance(engines, EngineSide):
        return [engines]
    if isinstance(engines, Sequence) and not isinstance(engines, str | bytes):
        return [e for i, x in enumerate(engines) for e in [_one_engine(x, i)]]
    return [_one_engine(engines, 0)]


def _one_engine(x: Any, i: int) -> EngineSide:
    if isinstance(x, EngineSide):
        return x
    return RpcEngine(x, name=f"engine replica {i}")


class Refitter:
    """Moves the trainer's weights into the engine replicas, shard to shard."""

    def __init__(
        self,
        train_worker: TrainerSide,
        vllm_engine: Any,
        *,
        path: Path = "auto",
        streams: int = 2,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        staging_bytes: int | None = None,
        misc_bucket_bytes: int = DEFAULT_MISC_BUCKET_BYTES,
        host: str = "127.0.0.1",
        backend: str = "gloo",
        timeout_s: float = 600.0,
        verify: bool = False,
    ) -> None:
        if path not in PATHS:
            raise RefitError(f"path must be one of {PATHS}, got {path!r}")
        if streams < 1:
            raise RefitError(f"streams must be >= 1, got {streams}")
        self.trainer = train_worker
        self.engines = _engine_sides(vllm_engine)
        self.path: Path = path
        self.streams = streams
        # an engine rank holds `streams` staging sets of two receive buffers of one bucket
        if staging_bytes is not None:
            bucket_bytes = min(bucket_bytes, staging_bytes // (2 * streams))
            if bucket_bytes < 1 << 16:
                raise RefitError(
                    f"staging_bytes={staging_bytes} leaves buckets of {bucket_bytes} B for "
                    f"{streams} streams; allow at least {2 * streams << 16} B"
                )
        self.staging_bytes = staging_bytes
        self.bucket_bytes = bucket_bytes
        self.misc_bucket_bytes = misc_bucket_bytes
        self.host = host
        self.backend = backend
        self.timeout_s = timeout_s
        self.verify = verify
        self.plan: RefitPlan | None = None
        self.version = 0  # the last refit attempted
        self.installed = 0  # the last refit that completed on every engine
        self.generation = 0
        self._connected = False
        self._store: Any = None
        self._board: FailureBoard | None = None
        self._engine_specs: list[Any] = []
        self._prepare_seconds = 0.0

    def prepare(self) -> RefitPlan:
        """Describe, validate and plan (once); connect every rank (again after a failure).

        Validation happens here, before any rank communicates: every inconsistency between
        the two sides' descriptions is raised at once as a `RefitError`."""
        t0 = time.perf_counter()
        if self.plan is None:
            trainer_spec = self.trainer.describe()
            engine_specs = [e.describe() for e in self.engines]
            self._engine_specs = engine_specs
            self.plan = plan_refit(
                trainer_spec, engine_specs, misc_bucket_bytes=self.misc_bucket_bytes
            )
            self._store = tcp_store(self.host, 0, is_master=True, timeout_s=self.timeout_s)
        if not self._connected:
            self._connect(self.plan)
        self._prepare_seconds += time.perf_counter() - t0
        return self.plan

    def _connect(self, plan: RefitPlan) -> None:
        self.generation += 1
        prefix = f"refit{id(self)}/gen{self.generation}"
        base = RankSetup(
            host=self.host,
            port=self._store.port,
            prefix=prefix,
            rank=0,
            plan=plan,
            path=self.path,
            bucket_bytes=self.bucket_bytes,
            streams=self.streams,
            backend=self.backend,
            timeout_s=self.timeout_s,
            verify=self.verify,
        )
        pendings = [self.trainer.connect(pickle.dumps(base))]
        for i, e in enumerate(self.engines):
            pendings.append(e.connect(pickle.dumps(replace(base, rank=plan.engine_rank(i, 0)))))
        try:
            wait_all(pendings, timeout=self.timeout_s)
        except RefitError as e:
            raise RefitError(
                [f"could not connect the ranks (generation {self.generation}):", *e.violations]
            ) from e
        self._board = FailureBoard(self._store, prefix)
        self._connected = True

    def refit(self, *, path: Path | None = None) -> RefitStats:
        """Move the trainer's current weights into every engine replica. `path` overrides
        the configured xfer path for this refit (e.g. ``"golden"`` to debug)."""
        if path is not None and path not in PATHS:
            raise RefitError(f"path must be one of {PATHS}, got {path!r}")
        plan = self.prepare()
        assert self._board is not None
        board = self._board
        self.version += 1
        version = self.version
        t0 = time.perf_counter()
        pendings = [self.trainer.step(version, path)]
        pendings += [e.step(version, path) for e in self.engines]

        def stop_everyone(why: str) -> None:
            board.post(version, Failure(-1, "driver", "waiting for the ranks", why))

        try:
            # ranks stop at their own deadline; the driver waits a little longer
            results = wait_all(pendings, timeout=self.timeout_s + 5, on_failure=stop_everyone)
        except RefitError as e:
            self._connected = False  # this generation's groups are broken
            failures = board.read(version)
            raise RefitFailed(
                version,
                failures,
                note=f"the engines keep the weights of refit {self.installed}; "
                "the next refit reconnects every rank",
            ) from e
        self.installed = version
        seconds = time.perf_counter() - t0
        ranks = tuple(s for group in results for s in group)
        engine = [s for s in ranks if s.role == "engine"]
        phases: dict[str, float] = {}
        for s in engine:
            for k, v in s.phases.items():
                phases[k] = max(phases.get(k, 0.0), v)
        return RefitStats(
            version=self.version,
            seconds=seconds,
            bulk_bytes=sum(s.bulk_received for s in engine),
            misc_bytes=sum(st_bytes for st in plan.stages for st_bytes in st.buckets),
            phases=phases,
            peak_staging_bytes=max((s.staging_bytes for s in ranks), default=0),
            ranks=ranks,
        )

    @property
    def prepare_seconds(self) -> float:
        return self._prepare_seconds

    def replace_engine(self, replica: int, engine: Any) -> None:
        """Swap engine replica `replica` (e.g. one whose process died) for a new one of the
        same model and layout; the next refit checks it describes the same parameters and
        reconnects every rank."""
        new = _one_engine(engine, replica)
        if self._engine_specs and new.describe() != self._engine_specs[replica]:
            raise RefitError(
                f"the new engine replica {replica} does not describe the same parameters as "
                "the one it replaces"
            )
        self.engines[replica] = new
        self._connected = False

    def status(self) -> list[list[Any]]:
        """Each engine replica's per-rank install status (version, stale, consistent)."""
        return [e.status() for e in self.engines]  # type: ignore[attr-defined]
