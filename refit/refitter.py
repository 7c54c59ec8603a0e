"""`Refitter`: the product. ``Refitter(train_worker, vllm_engine).refit()`` every RL step.

`prepare` (run by the first `refit`, or explicitly) asks both sides to describe their
parameters, plans (`plan_refit`, pure), picks the backend from where the two sides' tensors
live, starts the refit's store on `host`, and has every rank join the refit's communicator and
build its xfer plan. Every `refit` then bumps the version, starts both sides at once and waits
for both; it returns `RefitStats`.

`vllm_engine` may be: an ``LLM`` built with ``weight_transfer_config={"backend": "xfer"}``,
the base URL of a ``vllm serve`` started with ``--weight-transfer-config '{"backend":
"xfer"}'``, or one of vLLM's weight-sync clients (all driven through vLLM's own
weight-transfer API, `refit.native`; servers are paused in `pause` mode around each install);
an ``LLM`` created with the project's worker extension (``collective_rpc``, `refit.rpc`); any
`EngineSide`; or a list of these (engine replicas).

Where. The refit's store listens on `host` only; ``"auto"`` (the default) is loopback when
every rank runs on this machine (sides that know, e.g. Ray actors, report their nodes'
addresses) and this machine's routable address otherwise. gloo ranks listen on the address
that reaches the store.

Trust. The store and the ranks' communicator are reachable by anyone on the network who can
reach `host`; the refit never deserializes code from them. Descriptions and setups travel over
the trusted control channel (Ray, ``collective_rpc``) as JSON; everything the ranks read from
the store is JSON sealed with a fresh random token per `Refitter` (`refit.watch`); tensor bytes
are not authenticated or encrypted (``verify=True`` checks them against corruption). See the
README's trust model.

Failures: every rank runs a refit against a deadline (`timeout_s`) and a failure board in the
refit's store (`refit.watch`). When a rank fails, a rank process dies, or the deadline passes,
every rank stops within a fraction of a second and `refit` raises `RefitFailed` naming each
failing rank and its phase. The ranks release that generation's communicator; the next
`refit` reconnects every rank (a new generation, same plan, engines keep running). An engine
whose install did not complete keeps, or rolls back to, its previous weights and is marked
stale until a refit completes (`status`). With ``verify=True`` every engine rank also checks
each received tensor against checksums from its senders before it installs anything. One
refit runs at a time: a second concurrent call raises at once. ``strict=True`` (tests,
debugging) holds every rank to NCCL's completion and ordering rules on any backend
(`xfer.strict`), at the cost of copies and digests of every buffer.

Memory: a rank keeps two send and two receive staging buffers of at most `bucket_bytes`
(per round, a rank sends and receives at most that); `staging_bytes` caps what an engine rank
stages (the bucket becomes ``staging_bytes // 2``); `max_extra_bytes` is a budget per engine
rank from which the bucket is derived once the plan knows the misc tensors
(``(max_extra_bytes - misc bytes) // 2``). Engine ranks also hold each misc tensor
whole while they load it, and, for modules installed *staged*, a checkpoint-format copy
until the install finishes. ``install="live"`` (the default on GPUs) writes bulk straight
into the running weights wherever nothing processes them after loading: no copy, but a
failed refit cannot roll those modules back; ``install="staged"`` keeps the rollback.
`RefitStats.engine_extra_bytes` reports the largest total per engine rank.

Replicas: engine replicas of one layout forward what they received to the next replica
(`relay`, `xfer.plan`): each trainer byte leaves the trainer once per chain instead of once
per replica, so the trainer's egress stops growing with the number of replicas. ``relay=None``
(default) relays when the plan's rounds model says it is faster (many replicas, several
rounds), ``False`` never, ``True`` always, an int sets the chains per replica class. A
forwarding engine rank receives the rounds it forwards staged and, in the next round, sends
that staging on as it lies: a hop costs one round and no memory beyond the two receive
buffers. Delta refits move on the plan without relay. A tensor region of at least
`part_bytes` (default: the bucket / 64; 0: never) travels as a message of its own, straight
from and into storage where it is contiguous (`xfer.plan`).

Deltas: ``delta=True`` sends, after the first refit of each communicator generation, only
what changed since the previous refit, message by message on the same plan (`xfer.delta`):
bit-identical to a dense refit. Every trainer rank keeps a copy of the shards it last sent,
and every engine rank a copy of what it last received except where the bytes land in its
running weights (``install="live"``: patched in place), `RefitStats.baseline_bytes`, in host
memory unless ``baselines="device"``. A generation's first refit, every refit after a failure
or a replaced engine, and every `full_every`-th refit are dense; ranks agree on the version a delta is against before any
byte moves, and a refused delta (a rank holding other baselines) is followed at once by a
dense refit (`RefitStats.resynced`). With ``receive_while_serving=True`` (engines driven
through vLLM's weight-transfer API: servers, `LLM`, `AsyncLLM`), each refit's bytes arrive
into the engine ranks' baselines while the engine keeps generating; the engine is paused (in
`pause` mode) only to install them (`RefitStats.pause_s`; `seconds` is the whole refit).
Requests either finish on the old weights or wait for the new ones; none sees a mix.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from refit.errors import RefitError
from refit.native import NativeEngine, is_native
from refit.pending import wait_all
from refit.planner import RefitPlan, plan_refit
from refit.rank import RankStats
from refit.rpc import RpcEngine
from refit.setup import BASELINES, INSTALLS, RankOptions, RankSetup
from refit.spec import EngineSide, EngineSpec, EngineStatus, TrainerSide
from refit.watch import Failure, FailureBoard, RefitFailed
from xfer import DEFAULT_BUCKET_BYTES, tcp_store
from xfer.api import PATHS, Path
from xfer.net import is_local, routable_address
from xfer.plan import check_part_bytes
from xfer.relay import check_relay

__all__ = ["BACKENDS", "RefitStats", "Refitter", "choose_backend"]

log = logging.getLogger(__name__)
MIN_BUDGET_BUCKET = 1 << 16  # smallest bucket a memory budget may leave

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class RefitStats:
    version: int
    seconds: float
    bulk_bytes: int  # received by all engine ranks
    misc_bytes: int  # misc tensors received by all engine ranks
    phases: dict[str, float]  # slowest engine rank's phases
    peak_staging_bytes: int  # largest staging held by any rank
    engine_extra_bytes: int  # most memory an engine rank allocated for the refit
    trainer_extra_bytes: int  # most memory a trainer rank allocated for the refit
    ranks: tuple[RankStats, ...] = field(repr=False)
    # records in the refit's store that ranks ignored as not authentic (written by someone
    # without the refit's token): should be 0; anything else means someone reaches the store
    ignored_records: int = 0
    delta: bool = False  # sent as a sparse delta against the previous refit
    wire_bytes: int = 0  # payload bytes the engines received (a delta: the encoded bytes)
    baseline_bytes: int = 0  # most delta baselines one rank keeps (host memory by default)
    resynced: bool = False  # a refused delta was followed at once by a dense refit
    # longest time an engine replica served nothing new for this refit: the whole engine
    # step, or with receive_while_serving only the install after the bytes arrived
    pause_s: float = 0.0
    # bytes the trainer ranks sent, and those engine ranks forwarded to other replicas
    trainer_sent_bytes: int = 0
    relayed_bytes: int = 0

    @property
    def gbps(self) -> float:
        """Bulk bytes received by the engines per second, in GB/s."""
        return self.bulk_bytes / self.seconds / 1e9 if self.seconds else 0.0

    def summary(self) -> str:
        return (
            f"refit {self.version}: {self.seconds:.3f} s, {self.bulk_bytes / 2**20:.1f} MiB bulk "
            f"+ {self.misc_bytes / 2**20:.2f} MiB misc, {self.gbps:.2f} GB/s; extra memory per "
            f"engine rank {self.engine_extra_bytes / 2**20:.1f} MiB, per trainer rank "
            f"{self.trainer_extra_bytes / 2**20:.1f} MiB; engines paused {self.pause_s:.3f} s"
            + (
                f"; delta: {self.wire_bytes / 2**20:.2f} MiB on the wire, baselines "
                f"{self.baseline_bytes / 2**20:.1f} MiB per rank"
                if self.delta
                else ""
            )
        )


def choose_backend(requested: str, trainer: str, engine: str) -> str:
    """The communicator backend for a trainer and engines whose tensors live on the given
    device types; `RefitError` for combinations no backend moves."""
    if requested not in BACKENDS:
        raise RefitError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if trainer != engine:
        raise RefitError(
            f"the trainer's tensors are on {trainer} but the engine's on {engine}: neither gloo "
            "(CPU tensors) nor NCCL (CUDA tensors) moves between them; put both on the same "
            "kind of device"
        )
    need = "nccl" if trainer == "cuda" else "gloo"
    if requested not in ("auto", need):
        raise RefitError(
            f"backend={requested!r} cannot move {trainer} tensors ("
            + ("gloo send/recv does not take CUDA tensors" if need == "nccl" else "NCCL needs CUDA")
            + f"); use backend='auto' or {need!r}"
        )
    return need


def _engine_sides(engines: Any, pause: str | None = "wait") -> list[EngineSide]:
    if isinstance(engines, EngineSide):
        sides = [engines]
    elif isinstance(engines, Sequence) and not isinstance(engines, str | bytes):
        sides = [_one_engine(x, i, pause) for i, x in enumerate(engines)]
    else:
        sides = [_one_engine(engines, 0, pause)]
    if not sides:
        raise RefitError("no engine replicas given")
    keys = [getattr(s, "key", s) for s in sides]
    dup = [i for i, k in enumerate(keys) if any(k is o or k == o for o in keys[:i])]
    if dup:
        raise RefitError(
            f"engine replicas {dup} repeat an earlier replica (the same engine listed twice); "
            "each replica must be a different engine"
        )
    return sides


def _one_engine(x: Any, i: int, pause: str | None = "wait") -> EngineSide:
    if isinstance(x, EngineSide):
        return x
    if is_native(x):  # vLLM's weight-transfer API with the "xfer" backend
        return NativeEngine(x, name=f"engine replica {i}", pause=pause)
    return RpcEngine(x, name=f"engine replica {i}")


def _refused_delta(e: RefitFailed) -> bool:
    return any("asked for a delta against version" in f.message for f in e.failures)


def budget_bucket(budget: int, misc_bytes: int, bucket_bytes: int) -> int:
    """The bucket that keeps an engine rank's extra memory within `budget` bytes: two receive
    buffers of one bucket (a rank that forwards to another replica sends from them and
    stages no send) plus every misc tensor whole (`misc_bytes`), at most `bucket_bytes`.
    A staged install's copies come on top: use ``install="live"`` where the budget is tight."""
    bucket = min(bucket_bytes, (budget - misc_bytes) // 2)
    if bucket < MIN_BUDGET_BUCKET:
        raise RefitError(
            f"max_extra_bytes={budget} does not fit: the misc tensors alone take {misc_bytes} B "
            f"on every engine rank, leaving buckets of {bucket} B (at least {MIN_BUDGET_BUCKET})"
        )
    log.info("memory budget %d B: bucket %d B (misc %d B)", budget, bucket, misc_bytes)
    return bucket


class Refitter:
    """Moves the trainer's weights into the engine replicas, shard to shard."""

    def __init__(
        self,
        train_worker: TrainerSide,
        vllm_engine: Any,
        *,
        path: Path = "auto",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        staging_bytes: int | None = None,
        max_extra_bytes: int | None = None,
        host: str = "auto",
        backend: str = "auto",
        timeout_s: float = 600.0,
        verify: bool = False,
        strict: bool = False,
        install: str = "auto",
        delta: bool = False,
        full_every: int = 0,
        baselines: str = "cpu",
        relay: bool | int | None = None,
        part_bytes: int | None = None,
        receive_while_serving: bool = False,
        pause: str | None = "wait",
        store: Any = None,
        token: bytes | None = None,
    ) -> None:
        problems = []
        if path not in PATHS:
            problems.append(f"path must be one of {PATHS}, got {path!r}")
        if backend not in BACKENDS:
            problems.append(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s <= 0:
            problems.append(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if not isinstance(bucket_bytes, int) or bucket_bytes < 1 << 16:
            problems.append(f"bucket_bytes must be an int >= 65536, got {bucket_bytes!r}")
        # an engine rank holds two receive buffers of one bucket
        if staging_bytes is not None:
            bucket_bytes = min(bucket_bytes, staging_bytes // 2)
            if bucket_bytes < 1 << 16:
                problems.append(
                    f"staging_bytes={staging_bytes} leaves buckets of {bucket_bytes} B; allow at "
                    f"least {2 << 16} B"
                )
        if install not in INSTALLS:
            problems.append(f"install must be one of {INSTALLS}, got {install!r}")
        if isinstance(full_every, bool) or not isinstance(full_every, int) or full_every < 0:
            problems.append(f"full_every must be an int >= 0 (0: never), got {full_every!r}")
        if baselines not in BASELINES:
            problems.append(f"baselines must be one of {BASELINES}, got {baselines!r}")
        problems += check_relay(relay)
        problems += check_part_bytes(part_bytes)
        if receive_while_serving and not delta:
            problems.append(
                "receive_while_serving=True needs delta=True: the bytes arrive into the delta "
                "baselines while the engine serves"
            )
        if delta and path not in ("auto", "p2p"):
            problems.append(f"delta=True moves bytes on path 'p2p' (or 'auto'), not {path!r}")
        if problems:
            raise RefitError(problems)
        self.trainer = train_worker
        self.engines = _engine_sides(vllm_engine, pause)
        cannot = [
            f"{i} ({type(e).__name__})"
            for i, e in enumerate(self.engines)
            if not hasattr(e, "receive_while_serving")
        ]
        if receive_while_serving and cannot:
            raise RefitError(
                f"receive_while_serving=True: engine replicas {', '.join(cannot)} cannot receive "
                "while they serve (a collective_rpc blocks the engine for the whole refit); start "
                'them with weight_transfer_config={"backend": "xfer"} and pass the LLM, AsyncLLM '
                "or server URL"
            )
        self.path: Path = path
        self.staging_bytes = staging_bytes
        self.max_extra_bytes = max_extra_bytes
        self.bucket_bytes = bucket_bytes
        self.host = host
        self.backend = backend
        self.timeout_s = float(timeout_s)
        self.verify = verify
        self.strict = strict
        self.install = install
        self.delta = bool(delta)
        self.full_every = full_every
        self.baselines = baselines
        self.relay = relay
        self.part_bytes = part_bytes
        self.receive_while_serving = bool(receive_while_serving)
        self.plan: RefitPlan | None = None
        self.version = 0  # the last refit attempted
        self.installed = 0  # the last refit that completed on every engine
        self.generation = 0
        self._connected = False
        self._store: Any = store  # a store server of the caller's, or one started here
        self._board: FailureBoard | None = None
        self._token = token or secrets.token_bytes(32)
        self._session = secrets.token_hex(8)
        self._specs: tuple[Any, list[EngineSpec]] | None = None
        self._prepare_seconds = 0.0
        self._lock = threading.Lock()

    def prepare(self) -> RefitPlan:
        """Describe, validate and plan (once); connect every rank (again after a failure).

        Validation happens here, before any rank communicates: every inconsistency between
        the two sides' descriptions is raised at once as a `RefitError`."""
        t0 = time.perf_counter()
        if self.plan is None:
            self.host = self._resolve_host()
            if self._store is None:
                try:
                    self._store = tcp_store(self.host, 0, is_master=True, timeout_s=self.timeout_s)
                except (OSError, RuntimeError) as e:
                    raise RefitError(
                        f"cannot start the refit's store on host {self.host!r}: {e}; pass a "
                        "host (an address of this machine) every rank can reach"
                    ) from None
            for i, side in enumerate(self.engines):
                self._attach(side, i)
            trainer_spec = self.trainer.describe()
            engine_specs = [e.describe() for e in self.engines]
            plan = plan_refit(trainer_spec, engine_specs)
            self.backend = choose_backend(self.backend, trainer_spec.device, engine_specs[0].device)
            if self.receive_while_serving and self.backend == "nccl" and plan.replica_world > 1:
                raise RefitError(
                    "receive_while_serving=True over NCCL needs engines of one GPU each: an "
                    f"engine of {plan.replica_world} GPUs runs its own NCCL collectives while it "
                    "serves, and NCCL requires operations on different communicators to be "
                    "issued in the same order on every rank (concurrent ones can deadlock)"
                )
            if self.max_extra_bytes is not None:
                misc = sum(e.nbytes for e in plan.misc)
                self.bucket_bytes = budget_bucket(self.max_extra_bytes, misc, self.bucket_bytes)
            self._specs = (trainer_spec, engine_specs)
            self.plan = plan
            log.info(
                "planned: %s; backend %s, store on %s:%d",
                plan.summary(),
                self.backend,
                self.host,
                self._store.port,
            )
        if not self._connected:
            self._connect()
        self._prepare_seconds += time.perf_counter() - t0
        assert self.plan is not None
        return self.plan

    def _resolve_host(self) -> str:
        """`host`, or with ``"auto"``: loopback when every rank runs on this machine (as far
        as the sides can tell, `node_addresses`), else this machine's routable address."""
        if self.host != "auto":
            return self.host
        addresses: set[str] = set()
        for side in [self.trainer, *self.engines]:
            fn = getattr(side, "node_addresses", None)
            if fn is not None:
                addresses |= set(fn())
        if all(is_local(a) for a in addresses):
            return "127.0.0.1"
        return routable_address()

    def _attach(self, engine: EngineSide, replica: int) -> None:
        """Tell an engine that reports through the store (`NativeEngine`) where it is."""
        attach = getattr(engine, "attach", None)
        if attach is not None:
            attach(
                self._store,
                self.host,
                f"refit/{self._session}",
                self._token,
                replica,
                timeout_s=self.timeout_s,
                receive_while_serving=self.receive_while_serving,
            )

    def _connect(self) -> None:
        assert self._specs is not None and self.plan is not None
        self.generation += 1
        prefix = f"refit/{self._session}/gen{self.generation}"
        trainer_spec, engine_specs = self._specs
        base = RankSetup(
            host=self.host,
            port=self._store.port,
            prefix=prefix,
            token=self._token.hex(),
            rank=0,
            trainer=trainer_spec,
            engine=engine_specs[0],
            replicas=len(engine_specs),
            options=RankOptions(
                path=self.path,
                bucket_bytes=self.bucket_bytes,
                backend=self.backend,
                timeout_s=self.timeout_s,
                verify=self.verify,
                strict=self.strict,
                install=self.install,
                delta=self.delta,
                full_every=self.full_every,
                baselines=self.baselines,
                relay=self.relay,
                part_bytes=self.part_bytes,
            ),
        )
        pendings = [self.trainer.connect(base.to_json())]
        for i, e in enumerate(self.engines):
            setup = base.for_rank(self.plan.engine_rank(i, 0)).to_json()
            pendings.append(e.connect(setup, self.installed))
        try:
            wait_all(pendings, timeout=self.timeout_s + 5)
        except RefitError as e:
            raise RefitError(
                [f"could not connect the ranks (generation {self.generation}):", *e.violations]
            ) from e
        self._board = FailureBoard(self._store, f"{prefix}/board", self._token)
        self._connected = True
        log.info("connected %d ranks (generation %d)", self.plan.world, self.generation)

    def refit(self, *, path: Path | None = None) -> RefitStats:
        """Move the trainer's current weights into every engine replica. `path` overrides
        the configured xfer path for this refit (e.g. ``"golden"`` to debug)."""
        if path is not None and path not in PATHS:
            raise RefitError(f"path must be one of {PATHS}, got {path!r}")
        if not self._lock.acquire(blocking=False):
            raise RefitError(
                "a refit is already running on this Refitter; refits of one Refitter run one at "
                "a time"
            )
        try:
            try:
                return self._refit(path)
            except RefitFailed as e:
                if not (self.delta and _refused_delta(e)):
                    raise
                # a rank's baselines are not the weights the others diffed against (nothing
                # moved): every rank reconnects, and a new generation starts dense
                log.warning("refit %d: a delta was refused (%s); resyncing dense", e.version, e)
                return replace(self._refit(path), resynced=True)
        finally:
            self._lock.release()

    def _refit(self, path: Path | None) -> RefitStats:
        self.prepare()
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
            self._connected = False  # this generation's communicator is gone
            failures = board.read(version)
            # what the driver saw of every side (a dead process, a rank that never answered):
            # ranks that died could not post their own failure
            seen = Failure(-1, "driver", "the refit's outcome", " | ".join(e.violations))
            if seen.message not in {f.message for f in failures}:
                failures.append(seen)
            log.warning("refit %d failed: %s", version, "; ".join(f.describe() for f in failures))
            raise RefitFailed(
                version,
                failures,
                note=f"the engines keep the weights of refit {self.installed} or are marked "
                "stale (see status()); the next refit reconnects every rank",
            ) from e
        self.installed = version
        seconds = time.perf_counter() - t0
        ranks = tuple(s for group in results for s in group)
        engine = [s for s in ranks if s.role == "engine"]
        trainer = [s for s in ranks if s.role == "trainer"]
        phases: dict[str, float] = {}
        for s in engine:
            for k, v in s.phases.items():
                phases[k] = max(phases.get(k, 0.0), v)
        ignored = sum(s.ignored for s in ranks)
        if ignored:
            log.warning(
                "ranks ignored %d records in the refit's store that were not sealed with its "
                "token: someone who reaches %s:%d writes there",
                ignored,
                self.host,
                self._store.port,
            )
        stats = RefitStats(
            version=self.version,
            seconds=seconds,
            bulk_bytes=sum(s.bulk_received for s in engine),
            misc_bytes=sum(s.misc_bytes for s in engine),
            phases=phases,
            peak_staging_bytes=max((s.staging_bytes for s in ranks), default=0),
            engine_extra_bytes=max((s.extra_bytes for s in engine), default=0),
            trainer_extra_bytes=max((s.extra_bytes for s in trainer), default=0),
            ranks=ranks,
            ignored_records=ignored,
            delta=any(s.delta for s in ranks),
            wire_bytes=sum(s.wire_bytes for s in engine),
            baseline_bytes=max((s.baseline_bytes for s in ranks), default=0),
            pause_s=max((s.phases.get("paused", s.seconds) for s in engine), default=0.0),
            trainer_sent_bytes=sum(s.bulk_sent for s in trainer),
            relayed_bytes=sum(s.bulk_sent for s in engine),
        )
        log.info("%s", stats.summary())
        return stats

    @property
    def prepare_seconds(self) -> float:
        return self._prepare_seconds

    def replace_engine(self, replica: int, engine: Any) -> None:
        """Swap engine replica `replica` (e.g. one whose process died) for a new one of the
        same model and layout, checked to describe the same parameters. Once a refit has
        completed, every rank reconnects at once, so the new engine knows it is behind: it
        reports itself stale (and the generate helpers refuse it) until a refit completes."""
        new = _one_engine(engine, replica)
        others = [e for i, e in enumerate(self.engines) if i != replica]
        _engine_sides([*others, new])  # refuses an engine listed twice
        if self._store is not None:
            self._attach(new, replica)
        if self._specs is not None and new.describe() != self._specs[1][replica]:
            raise RefitError(
                f"the new engine replica {replica} does not describe the same parameters as "
                "the one it replaces"
            )
        self.engines[replica] = new
        self._connected = False
        if self.installed:
            self.prepare()

    def status(self) -> list[list[EngineStatus]]:
        """Each engine replica's per-rank `EngineStatus` (version, stale, what it holds)."""
        return [e.status() for e in self.engines]
