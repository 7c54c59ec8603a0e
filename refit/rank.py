"""`RefitRank`: one rank's part of every refit, inside a trainer or engine process.

Built once per rank from a `RankSetup` (the plan, this rank's refit rank, where the store is):
it joins every stage group it belongs to (a trainer rank: its own stage; an engine rank: all
of them, in stage order, so group creation cannot deadlock) and builds one `Resharder` per
group. Then every step:

trainer rank
    runs its stage's plan with its local shards as sources (the stage owner also receives the
    misc parameters it must gather), then the owner broadcasts the misc buckets.
engine rank
    ``hooks.begin`` makes the destination storage writable; the stages run on at most
    `streams` workers at once (threads, each with its own CUDA stream on GPU) sharing
    `streams` sets of staging buffers, so peak staging is bounded by ``streams`` sets whatever
    the number of stages; the misc buckets are unpacked and handed to ``hooks.load``;
    ``hooks.finish`` runs the engine's post-load processing.

The backend supplies the hooks: where a trainer's local shard of a name is, where an engine's
destination view of a name is, how the engine loads misc tensors and finishes an install.

Failures. Each step runs against a deadline (`RankSetup.timeout_s`) and a `FailureBoard` in
the refit's store: the rank's communicators poll it while they wait, so when any rank (or the
driver) posts a failure, or the deadline passes, every rank stops within a fraction of a
second and raises `RefitFailed` naming every failing rank and its phase. A rank whose step
raised posts its own failure first. After a failure the rank's communicators are broken
(`broken`); the driver reconnects the ranks (a new generation of groups) before the next
refit. `fault_injection`, when set (tests only), is called with each phase's name as the
phase starts, to cause a real failure at a precise point.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch

from refit.errors import RefitError
from refit.planner import RefitPlan, StagePlan, owner_layout
from refit.watch import Failure, FailureBoard, RefitFailed
from xfer import Resharder, Staging, TorchComm, Transfer, tcp_store
from xfer.api import Path
from xfer.checksum import box_checksum, sent_checksums
from xfer.segments import Local, copy_out

__all__ = ["EngineHooks", "RankSetup", "RankStats", "RefitRank", "fault"]


@dataclass(frozen=True)
class RankSetup:
    host: str
    port: int
    prefix: str
    rank: int  # refit rank
    plan: RefitPlan
    path: Path = "auto"
    bucket_bytes: int = 256 << 20
    streams: int = 2
    backend: str = "gloo"
    timeout_s: float = 600.0
    verify: bool = False  # checksum every bulk shard and misc tensor (see `xfer.checksum`)


@dataclass
class RankStats:
    rank: int
    role: str
    seconds: float = 0.0
    bulk_sent: int = 0
    bulk_received: int = 0
    misc_bytes: int = 0
    staging_bytes: int = 0
    phases: dict[str, float] = field(default_factory=dict)


class EngineHooks(Protocol):
    device: torch.device

    def begin(self, version: int) -> None: ...

    def view(self, name: str) -> torch.Tensor:
        """This rank's destination view of HF parameter `name` (a bulk parameter)."""
        ...

    def load(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Load whole misc tensors through the engine's own weight loading."""
        ...

    def finish(self, version: int) -> None: ...


LocalShard = Callable[[str], Local]  # a trainer's shard of a name: a tensor or Segments


def fault(kind: str, at: str) -> Callable[[str], None]:
    """A `RefitRank.fault_injection` hook (tests): when a phase whose name contains `at`
    starts, ``"raise"`` raises, ``"exit"`` ends the process, ``"sleep:S"`` sleeps S seconds."""

    def hook(phase: str) -> None:
        if at not in phase:
            return
        if kind == "raise":
            raise RuntimeError(f"injected fault in {phase}")
        if kind == "exit":
            import os

            os._exit(17)
        if kind.startswith("sleep:"):
            time.sleep(float(kind.split(":", 1)[1]))

    return hook


class RefitRank:
    def __init__(self, setup: RankSetup, *, device: torch.device | None = None) -> None:
        self.setup = setup
        self.rank = setup.rank
        self.plan = setup.plan
        self.device = device or torch.device("cpu")
        self.is_engine = setup.rank >= setup.plan.trainer_world
        self.role = "engine" if self.is_engine else "trainer"
        self.broken = False
        self.fault_injection: Callable[[str], None] | None = None
        self._interrupt: Callable[[], None] | None = None
        self._phases: dict[int, str] = {}
        self._failed_phase: str | None = None
        store = tcp_store(setup.host, setup.port, is_master=False, timeout_s=setup.timeout_s)
        self.board = FailureBoard(store, setup.prefix)
        self.stages: list[tuple[StagePlan, int, Resharder]] = []
        for st in self.plan.stages:
            g = st.group_rank(self.rank)
            if g is None:
                continue
            comm = TorchComm.create(
                store,
                g,
                len(st.ranks),
                prefix=f"{setup.prefix}/stage{st.stage}",
                backend=setup.backend,
                timeout_s=setup.timeout_s,
                device=self.device if setup.backend == "nccl" else None,
                interrupt=self._check,
            )
            rs = Resharder(st.items, comm, path=setup.path, bucket_bytes=setup.bucket_bytes)
            self.stages.append((st, g, rs))
        self._staging: queue.LifoQueue[Staging] = queue.LifoQueue()
        for _ in range(max(1, setup.streams)):
            self._staging.put(Staging())

    # -- failures --------------------------------------------------------------------------
    def _check(self) -> None:
        if self._interrupt is not None:
            self._interrupt()

    def _phase(self) -> str:
        return self._phases.get(threading.get_ident(), "setup")

    def _enter(self, phase: str) -> None:
        self._phases[threading.get_ident()] = phase
        if self.fault_injection is not None:
            self.fault_injection(phase)

    @contextmanager
    def _armed(self, version: int) -> Iterator[None]:
        """Run one step against the deadline and the failure board."""
        if self.broken:
            raise RefitFailed(
                version, [], note=f"{self.role} rank {self.rank} must reconnect first"
            )
        me = Failure(self.rank, self.role, "", "")
        deadline = time.monotonic() + self.setup.timeout_s
        self._interrupt = self.board.interrupt(version, deadline, me, self._phase)
        try:
            yield
            self._enter("commit")
            self.board.commit(version, self.plan.world, deadline, me)
        except RefitFailed:
            self.broken = True
            raise
        except BaseException as e:
            self.broken = True
            phase = self._failed_phase or self._phase()
            self.board.post(
                version, Failure(self.rank, self.role, phase, f"{type(e).__name__}: {e}")
            )
            raise RefitFailed(version, self.board.read(version)) from e
        finally:
            self._interrupt = None
            self._phases.clear()
            self._failed_phase = None

    # -- trainer ---------------------------------------------------------------------------
    def trainer_step(
        self, local: LocalShard, path: Path | None = None, version: int = 0
    ) -> RankStats:
        with self._armed(version):
            return self._trainer_step(local, path)

    def _trainer_step(self, local: LocalShard, path: Path | None) -> RankStats:
        t0 = time.perf_counter()
        stats = RankStats(self.rank, "trainer")
        for st, g, rs in self.stages:
            self._enter(f"stage {st.stage} bulk")
            srcs = [local(it.name) if it.src.holds(g) else None for it in st.items]
            dsts: list[torch.Tensor | None] = [None] * len(st.items)
            for i in range(st.bulk, len(st.items)):
                if st.items[i].dst.holds(g):
                    it = st.items[i]
                    dsts[i] = torch.empty(it.dst.shape, dtype=it.dtype, device=self.device)
            x = rs.run(srcs, dsts, path=path)
            if self.setup.verify:
                self._enter(f"stage {st.stage} verify")
                self._send_checksums(st, rs, srcs)
            stats.bulk_sent += x.bytes_sent
            stats.bulk_received += x.bytes_received
            stats.staging_bytes = max(stats.staging_bytes, rs.staging.nbytes)
            t1 = time.perf_counter()
            self._enter(f"stage {st.stage} misc")
            if g == 0:  # the stage owner: gathered misc tensors, or its own whole ones
                whole = {
                    e.name: dsts[e.gathered] if e.gathered is not None else local(e.name)
                    for e in st.misc
                }
                stats.misc_bytes += self._send_misc(st, rs, whole)
            else:
                self._recv_misc(st, rs)
                stats.misc_bytes += sum(st.buckets)
            stats.phases[f"stage{st.stage}.bulk"] = t1 - t0
            stats.phases[f"stage{st.stage}.misc"] = time.perf_counter() - t1
        stats.seconds = time.perf_counter() - t0
        return stats

    # -- engine ----------------------------------------------------------------------------
    def engine_step(self, hooks: EngineHooks, version: int, path: Path | None = None) -> RankStats:
        with self._armed(version):
            return self._engine_step(hooks, version, path)

    def _engine_step(self, hooks: EngineHooks, version: int, path: Path | None) -> RankStats:
        t0 = time.perf_counter()
        stats = RankStats(self.rank, "engine")
        self._enter("begin install")
        hooks.begin(version)
        t1 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, self.setup.streams)) as pool:
            parts = list(pool.map(lambda s: self._engine_stage(s, hooks, path), self.stages))
        t2 = time.perf_counter()
        misc: list[tuple[str, torch.Tensor]] = []
        for received, sent, tensors in parts:
            stats.bulk_received += received
            stats.bulk_sent += sent
            misc += tensors
        stats.misc_bytes = sum(t.numel() * t.element_size() for _, t in misc)
        stats.staging_bytes = sum(s.nbytes for s in list(self._staging.queue))
        self._enter("load misc")
        hooks.load(misc)
        t3 = time.perf_counter()
        self._enter("finish install")
        hooks.finish(version)
        t4 = time.perf_counter()
        stats.phases = {
            "begin": t1 - t0,
            "transfer": t2 - t1,
            "load_misc": t3 - t2,
            "finish": t4 - t3,
        }
        stats.seconds = t4 - t0
        return stats

    def _engine_stage(
        self, stage: tuple[StagePlan, int, Resharder], hooks: EngineHooks, path: Path | None
    ) -> tuple[int, int, list[tuple[str, torch.Tensor]]]:
        try:
            return self._engine_stage_inner(stage, hooks, path)
        except BaseException:
            if self._failed_phase is None:  # the first failing thread names the phase
                self._failed_phase = self._phase()
            raise

    def _engine_stage_inner(
        self, stage: tuple[StagePlan, int, Resharder], hooks: EngineHooks, path: Path | None
    ) -> tuple[int, int, list[tuple[str, torch.Tensor]]]:
        st, g, rs = stage
        self._enter(f"stage {st.stage} bulk")
        staging = self._staging.get()
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                dsts = [
                    hooks.view(it.name) if i < st.bulk and it.dst.holds(g) else None
                    for i, it in enumerate(st.items)
                ]
                x = rs.run([None] * len(st.items), dsts, stream=stream, staging=staging, path=path)
                if self.setup.verify:
                    self._enter(f"stage {st.stage} verify")
                    self._check_checksums(st, g, rs, dsts)
                self._enter(f"stage {st.stage} misc")
                tensors = self._recv_misc(st, rs)
            if stream is not None:
                stream.synchronize()
            return x.bytes_received, x.bytes_sent, tensors
        finally:
            self._staging.put(staging)

    # -- misc: packed broadcast from the stage owner (group rank 0) --------------------------
    def _send_misc(self, st: StagePlan, rs: Resharder, whole: dict[str, Local | None]) -> int:
        """Pack the stage's misc tensors into buckets, in plan order, and broadcast them."""
        for b, size in enumerate(st.buckets):
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            for e in st.misc:
                if e.bucket == b:
                    t = whole[e.name]
                    assert t is not None, f"stage owner has no whole {e.name}"
                    out = buf[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)
                    copy_out(t, tuple(slice(0, n) for n in e.shape), out)
            rs.comm.broadcast(buf, 0).wait()
        if self.setup.verify and st.misc:
            sums = [box_checksum(whole[e.name], owner_layout(e.shape), 0) for e in st.misc]
            rs.comm.broadcast(torch.tensor(sums, dtype=torch.int64, device=self.device), 0).wait()
        return sum(st.buckets)

    def _recv_misc(self, st: StagePlan, rs: Resharder) -> list[tuple[str, torch.Tensor]]:
        """Receive the stage's misc buckets; the tensors are views of the received buffers."""
        out: list[tuple[str, torch.Tensor]] = []
        for b, size in enumerate(st.buckets):
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            rs.comm.broadcast(buf, 0).wait()
            for e in st.misc:
                if e.bucket == b:
                    raw = buf[e.offset : e.offset + e.nbytes]
                    out.append((e.name, raw.view(e.dtype).view(e.shape)))
        if self.setup.verify and st.misc:
            sums = torch.zeros(len(st.misc), dtype=torch.int64, device=self.device)
            rs.comm.broadcast(sums, 0).wait()
            if self.is_engine:
                bad = []
                for e, want, (_, t) in zip(st.misc, sums.tolist(), out, strict=True):
                    got = box_checksum(t, owner_layout(e.shape), 0)
                    if got != want:
                        bad.append(f"{e.name} (expected {int(want)}, got {got})")
                if bad:
                    raise RefitError(
                        [f"engine rank {self.rank}: misc checksum mismatch: {b}" for b in bad]
                    )
        return out

    # -- verification: senders report per-receiver checksums, receivers compare -------------
    def _send_checksums(self, st: StagePlan, rs: Resharder, srcs: list[Local | None]) -> None:
        sums = sent_checksums(rs.plan, rs.program, srcs)
        engines = range(st.trainers, len(st.ranks))
        bufs = {
            e: torch.tensor([sums.get((i, e), 0) for i in range(st.bulk)], dtype=torch.int64)
            for e in engines
        }
        rs.comm.send_recv([Transfer(e, bufs[e].to(self.device)) for e in engines], []).wait()

    def _check_checksums(
        self, st: StagePlan, g: int, rs: Resharder, dsts: list[torch.Tensor | None]
    ) -> None:
        bufs = [
            torch.zeros(st.bulk, dtype=torch.int64, device=self.device) for _ in range(st.trainers)
        ]
        rs.comm.send_recv([], [Transfer(t, bufs[t]) for t in range(st.trainers)]).wait()
        want = torch.stack(bufs).sum(0).tolist() if bufs else []
        bad = []
        for i, it in enumerate(st.items[: st.bulk]):
            got = box_checksum(dsts[i], it.dst, g)
            if got != want[i]:
                bad.append(f"{it.name} (expected {int(want[i])}, got {got})")
        if bad:
            raise RefitError([f"engine rank {self.rank}: checksum mismatch: {b}" for b in bad[:20]])
