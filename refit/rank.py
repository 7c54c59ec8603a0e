"""`RefitRank`: one rank's part of every refit, inside a trainer or engine process.

Built once per rank (and again after a failure) from a `RankSetup` (`refit.setup`), the JSON
record the driver hands every rank over its trusted control channel: where the refit's store
is, the per-refit token, both sides' descriptions and the options. Every rank computes the same
`RefitPlan` from it (pure), joins the refit's one communicator (every trainer rank and every
engine rank) and builds one `xfer.Resharder` for all parameters, bulk and misc. Every step:

trainer rank
    runs the plan with its local shards as sources.
engine rank
    ``hooks.begin`` makes the destination storage writable; the plan runs into the engine's
    bulk destinations and into one buffer per misc parameter; ``hooks.load`` hands the misc
    tensors to the engine's own weight loading; ``hooks.finish`` runs its post-load
    processing.

The backend supplies the hooks: where a trainer's local shard of a name is, where an engine's
destination view of a name is, how the engine loads misc tensors and finishes an install.

GPUs. The transfer runs on a side stream of the rank's device (made once), which first waits
for the caller's current stream (the trainer's optimizer step, vLLM's own stream: the weights
and the storage `begin` prepared are ready) and which the caller's stream waits for at the
end (the trainer may change its weights, the engine may load and run them). NCCL works are
waited on that side stream, where the unpacking copies run.

Failures. Each step runs against a deadline (`RankOptions.timeout_s`) and a `FailureBoard` in
the refit's store: the communicator polls it while it waits, so when any rank (or the driver)
posts a failure, or the deadline passes, every rank stops within a fraction of a second and
raises `RefitFailed` naming every failing rank and its phase. A rank whose step raised posts
its own failure first. A rank that failed aborts its communicator (NCCL kernels waiting on a
dead peer end) and releases it at once (so failed refits leak no threads or sockets); the
driver connects the ranks again (a new generation) before the next refit. `on_phase`, when
set, is called with each phase's name as the phase starts (tests inject faults through it;
nothing in this module injects any).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from refit.errors import RefitError
from refit.setup import RankSetup
from refit.watch import Failure, FailureBoard, RefitFailed
from xfer import Comm, Resharder, TorchComm, tcp_store
from xfer.api import Delta, Path
from xfer.delta import Baselines
from xfer.execute import XferStats
from xfer.net import local_address_for
from xfer.segments import Local
from xfer.strict import StrictComm

__all__ = ["EngineHooks", "Gate", "RankStats", "RefitRank"]

log = logging.getLogger(__name__)


@dataclass
class RankStats:
    rank: int
    role: str
    seconds: float = 0.0
    bulk_sent: int = 0  # trainer ranks: sent; engine ranks: forwarded to replicas (relay)
    bulk_received: int = 0
    misc_bytes: int = 0  # misc tensors received (engine ranks)
    staging_bytes: int = 0  # staging buffers held
    extra_bytes: int = 0  # peak memory this rank allocated for the refit (staging + misc)
    wire_bytes: int = 0  # payload bytes this rank put on the wire (a delta: encoded bytes)
    delta: bool = False  # this refit was a delta against the previous one
    baseline_bytes: int = 0  # delta baselines kept (host memory unless baselines="device")
    ignored: int = 0  # records in the store this rank ignored as not authentic (so far)
    phases: dict[str, float] = field(default_factory=dict)


class Gate:
    """Between an engine rank that receives while its engine serves and whoever pauses the
    engine: `on_received` is called once the bytes are in (or the step failed before), and
    the rank installs once `paused` is set."""

    def __init__(self, on_received: Callable[[], None] | None = None) -> None:
        self.paused = threading.Event()
        self.arrived = threading.Event()
        self._on_received = on_received
        # the stream of whoever paused the engine (vLLM's worker stream): the install runs
        # on it, as an install on the worker's own thread would
        self.stream: Any = None

    def received(self) -> None:
        if not self.arrived.is_set():
            self.arrived.set()
            if self._on_received is not None:
                self._on_received()


class EngineHooks(Protocol):
    device: torch.device
    extra_bytes: int  # memory the install allocated (e.g. checkpoint-format copies)
    # optional: `persistent`, the bulk names whose destination views persist between
    # refits holding what the last one wrote (a delta patches them in place)

    def begin(self, version: int) -> None: ...

    def view(self, name: str) -> torch.Tensor:
        """This rank's destination view of HF parameter `name` (a bulk parameter)."""
        ...

    def load(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Load whole misc tensors through the engine's own weight loading."""
        ...

    def finish(self, version: int) -> None: ...


LocalShard = Callable[[str], Local]  # a trainer's shard of a name: a tensor or Segments


class RefitRank:
    def __init__(self, setup: RankSetup, *, device: torch.device | None = None) -> None:
        self.setup = setup
        self.options = setup.options
        self.rank = setup.rank
        self.plan = setup.plan()
        self.device = device or torch.device("cpu")
        if not 0 <= self.rank < self.plan.world:
            raise RefitError(f"refit rank {self.rank} outside 0..{self.plan.world - 1}")
        self.is_engine = self.rank >= self.plan.trainer_world
        self.role = "engine" if self.is_engine else "trainer"
        self.broken = False
        self.on_phase: Callable[[str], None] | None = None
        self._interrupt: Callable[[], None] | None = None
        self._phase = "setup"
        try:
            store = tcp_store(
                setup.host, setup.port, is_master=False, timeout_s=self.options.timeout_s
            )
        except (RuntimeError, OSError) as e:  # DistNetworkError, DistStoreError
            raise RefitError(
                f"{self.role} rank {self.rank}: cannot reach the refit's store at "
                f"{setup.host}:{setup.port} within {self.options.timeout_s:g} s ({e}); the "
                "Refitter's host must be an address of the driver's machine every rank reaches"
            ) from None
        self.board = FailureBoard(store, f"{setup.prefix}/board", bytes.fromhex(setup.token))
        comm: Comm = TorchComm.create(
            store,
            self.rank,
            self.plan.world,
            prefix=f"{setup.prefix}/group",
            backend=self.options.backend,
            timeout_s=self.options.timeout_s,
            device=self.device if self.options.backend == "nccl" else None,
            interrupt=self._check,
            # gloo listens on the address that reaches the store: loopback when the store is
            # on loopback, the node's routable address across machines
            host=local_address_for(setup.host) if self.options.backend == "gloo" else None,
        )
        if self.options.strict:
            comm = StrictComm(comm, name="refit")
        self.comm: Comm | None = comm
        self.resharder = Resharder(
            self.plan.items,
            self.comm,
            path=self.options.path,
            bucket_bytes=self.options.bucket_bytes,
            relay=self.options.relay,
            part_bytes=self.options.part_bytes,
        )
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        where = self.device if self.options.baselines == "device" else torch.device("cpu")
        self.baselines = Baselines(where)  # this generation's (a new generation starts dense)
        self._since_dense = 0
        # the version of this generation's last delta-capable run: what every rank's
        # baselines hold (kept apart from them, so a rank that lost its own says so)
        self._expected: int | None = None
        log.debug(
            "%s rank %d joined %s (%d ranks, %d items, %s)",
            self.role,
            self.rank,
            setup.prefix,
            self.plan.world,
            len(self.plan.items),
            self.options.backend,
        )
        self._lock = threading.Lock()

    # -- failures --------------------------------------------------------------------------
    def _check(self) -> None:
        if self._interrupt is not None:
            self._interrupt()

    def enter(self, phase: str) -> None:
        """Mark the start of `phase` (failures name it; `on_phase` sees it)."""
        log.debug("%s rank %d: %s", self.role, self.rank, phase)
        self._phase = phase
        if self.on_phase is not None:
            self.on_phase(phase)

    @contextlib.contextmanager
    def _armed(self, version: int) -> Iterator[None]:
        """Run one step against the deadline and the failure board."""
        if not self._lock.acquire(blocking=False):
            raise RefitError(f"{self.role} rank {self.rank}: a refit is already running here")
        try:
            if self.broken:
                raise RefitFailed(
                    version, [], note=f"{self.role} rank {self.rank} must reconnect first"
                )
            me = Failure(self.rank, self.role, "", "")
            deadline = time.monotonic() + self.options.timeout_s
            self._interrupt = self.board.interrupt(version, deadline, me, lambda: self._phase)
            try:
                yield
                if isinstance(self.comm, StrictComm):
                    self.enter("check order")
                    self.comm.check_order()
                self.enter("commit")
                self.board.commit(version, self.rank, self.plan.world, deadline, me)
            except RefitFailed as e:
                log.debug("%s rank %d stopped: %s", self.role, self.rank, e)
                self._fail()
                raise
            except BaseException as e:
                # post first: peers stop on the board, not on a connection this rank closes
                self.board.post(
                    version, Failure(self.rank, self.role, self._phase, f"{type(e).__name__}: {e}")
                )
                self._fail()
                raise RefitFailed(version, self.board.read(version)) from e
            finally:
                self._interrupt = None
                self._phase = "setup"
        finally:
            self._lock.release()

    def _fail(self) -> None:
        """Abort and release the communicator: its operations may never complete."""
        self.broken = True
        self.close()

    def close(self) -> None:
        comm, self.comm = self.comm, None
        if comm is not None:
            comm.abort()
            comm.close()
        self.resharder.release_staging()

    # -- streams -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transfer_stream(self) -> Iterator[None]:
        """Run the transfer on the side stream, joined with the caller's stream both ways."""
        if self.stream is None:
            yield
            return
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            yield
        main.wait_stream(self.stream)

    # -- delta -----------------------------------------------------------------------------
    def _delta(self, version: int, path: Path | None) -> Delta | None:
        """This refit's delta request (the same on every rank: they ran the same refits of
        this generation), or None for a plain run."""
        if not self.options.delta:
            return None
        if path == "golden":
            # the reference path leaves the baselines as they are: a delta applies to the
            # receivers' baselines (not to the engine's weights), so they stay true
            return None
        held = self._expected
        every = self.options.full_every
        if held is None or (every and self._since_dense + 1 >= every):
            return Delta(self.baselines, version, None)
        return Delta(self.baselines, version, held)

    def _run(
        self,
        srcs: list[Local | None],
        dsts: list[Local | None],
        path: Path | None,
        version: int,
        receive_only: bool = False,
        persistent: frozenset[str] = frozenset(),
    ) -> tuple[XferStats, bool]:
        """Run the plan (as a delta where this refit is one); its stats, and whether it was.
        `persistent`: bulk names whose destinations keep what the last refit wrote (patched
        in place by a delta, no baseline kept)."""
        delta = self._delta(version, path)
        if receive_only:
            assert delta is not None
            delta = replace(delta, receive_only=True)
        elif delta is not None and persistent:
            bulk = self.plan.items[: self.plan.bulk]
            keep = frozenset(i for i, it in enumerate(bulk) if it.name in persistent)
            delta = replace(delta, in_place=keep)
        x = self.resharder.run(srcs, dsts, path=path, delta=delta)
        if delta is not None:
            self._since_dense = 0 if delta.against is None else self._since_dense + 1
            self._expected = version
        return x, delta is not None and delta.against is not None

    # -- trainer ---------------------------------------------------------------------------
    def trainer_step(
        self, local: LocalShard, path: Path | None = None, version: int = 0
    ) -> RankStats:
        with self._armed(version):
            t0 = time.perf_counter()
            stats = RankStats(self.rank, "trainer")
            self.enter("transfer")
            srcs = [local(it.name) if it.src.holds(self.rank) else None for it in self.plan.items]
            with self._transfer_stream():
                x, stats.delta = self._run(srcs, [None] * len(srcs), path, version)
                if self.options.verify:
                    self.enter("verify")
                    self.resharder.verify(srcs, [None] * len(srcs))
            stats.bulk_sent = x.bytes_sent
            stats.wire_bytes = x.wire_bytes_sent
            stats.baseline_bytes = self.baselines.nbytes
            stats.staging_bytes = stats.extra_bytes = self.resharder.staging.nbytes
            stats.ignored = len(self.board.ignored)
            stats.phases["transfer"] = time.perf_counter() - t0
            stats.seconds = time.perf_counter() - t0
            return stats

    # -- engine ----------------------------------------------------------------------------
    def engine_step(
        self,
        hooks: EngineHooks,
        version: int,
        path: Path | None = None,
        gate: Gate | None = None,
    ) -> RankStats:
        """One refit into the engine. With a `gate` (and ``delta=True``; called on a thread
        of its own while the engine keeps serving), the bytes first arrive into the
        baselines without touching the engine (`Gate.on_received` is called), then the
        rank waits until `Gate.pause` says the engine is paused, and only then installs."""
        with self._armed(version):
            if gate is not None and self.options.delta and path != "golden":
                return self._engine_step_gated(hooks, version, path, gate)
            return self._engine_step(hooks, version, path)

    def _engine_step_gated(
        self, hooks: EngineHooks, version: int, path: Path | None, gate: Gate
    ) -> RankStats:
        plan, rank = self.plan, self.rank
        t0 = time.perf_counter()
        stats = RankStats(rank, "engine")
        none: list[Local | None] = [None] * len(plan.items)
        self.enter("receive while serving")
        with self._transfer_stream():
            x, stats.delta = self._run(none, list(none), path, version, receive_only=True)
        t1 = time.perf_counter()
        gate.received()
        self.enter("wait for the pause")
        while not gate.paused.wait(0.02):
            self._check()  # the deadline and the failure board still apply
        t2 = time.perf_counter()
        on = torch.cuda.stream(gate.stream) if gate.stream is not None else contextlib.nullcontext()
        with on:
            self.enter("begin install")
            hooks.begin(version)
            dsts, misc = self._destinations(hooks)
            self.enter("apply")
            with self._transfer_stream():
                self.resharder.apply(dsts, self.baselines)
                if self.options.verify:
                    self.enter("verify")
                    self._verify(dsts)
            t3 = time.perf_counter()
            self._fill(stats, x, hooks)
            load, finish = self._load_and_finish(hooks, misc, version)
        t5 = time.perf_counter()
        stats.phases = {
            "receive": t1 - t0,
            "wait_for_pause": t2 - t1,
            "apply": t3 - t2,
            "load_misc": load,
            "finish": finish,
            "paused": t5 - t2,
        }
        stats.seconds = t5 - t0
        return stats

    def _load_and_finish(
        self, hooks: EngineHooks, misc: list[tuple[str, torch.Tensor]], version: int
    ) -> tuple[float, float]:
        """Hand the misc tensors to the engine's loaders, then finish the install; the
        seconds each took."""
        t0 = time.perf_counter()
        self.enter("load misc")
        hooks.load(misc)
        t1 = time.perf_counter()
        self.enter("finish install")
        hooks.finish(version)
        return t1 - t0, time.perf_counter() - t1

    def _destinations(
        self, hooks: EngineHooks
    ) -> tuple[list[Local | None], list[tuple[str, torch.Tensor]]]:
        """Per item, this engine rank's destination (bulk: the engine's view; misc: a whole
        fresh buffer), and the misc buffers by name."""
        plan, rank = self.plan, self.rank
        dsts: list[Local | None] = [
            hooks.view(it.name) if i < plan.bulk and it.dst.holds(rank) else None
            for i, it in enumerate(plan.items)
        ]
        misc = []
        for e in plan.misc:
            buf = torch.empty(e.shape, dtype=e.dtype, device=self.device)
            dsts[e.item] = buf
            misc.append((e.name, buf))
        return dsts, misc

    def _verify(self, dsts: list[Local | None]) -> None:
        bad = self.resharder.verify([None] * len(dsts), dsts)
        if bad:
            raise RefitError([f"engine rank {self.rank}: checksum mismatch: {b}" for b in bad[:20]])

    def _fill(self, stats: RankStats, x: XferStats, hooks: EngineHooks) -> None:
        plan, rank = self.plan, self.rank
        stats.bulk_received = sum(
            math.prod(it.dst.local_shape(rank)) * it.itemsize for it in plan.items[: plan.bulk]
        )
        stats.misc_bytes = sum(e.nbytes for e in plan.misc)
        stats.wire_bytes = x.wire_bytes_received
        stats.bulk_sent = x.bytes_sent  # forwarded to other replicas (relay)
        stats.baseline_bytes = self.baselines.nbytes
        stats.staging_bytes = self.resharder.staging.nbytes
        # staging, the misc tensors, and the checkpoint-format copies the install made
        stats.extra_bytes = stats.staging_bytes + stats.misc_bytes + hooks.extra_bytes
        stats.ignored = len(self.board.ignored)

    def _engine_step(self, hooks: EngineHooks, version: int, path: Path | None) -> RankStats:
        t0 = time.perf_counter()
        stats = RankStats(self.rank, "engine")
        self.enter("begin install")
        hooks.begin(version)
        t1 = time.perf_counter()
        self.enter("transfer")
        dsts, misc = self._destinations(hooks)
        persistent = frozenset(getattr(hooks, "persistent", ()))
        with self._transfer_stream():
            x, stats.delta = self._run(
                [None] * len(dsts), dsts, path, version, persistent=persistent
            )
            if self.options.verify:
                self.enter("verify")
                self._verify(dsts)
        t2 = time.perf_counter()
        self._fill(stats, x, hooks)
        load, finish = self._load_and_finish(hooks, misc, version)
        stats.phases = {"begin": t1 - t0, "transfer": t2 - t1, "load_misc": load, "finish": finish}
        stats.seconds = time.perf_counter() - t0
        return stats
