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
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from refit.planner import RefitPlan, StagePlan
from xfer import Resharder, Staging, TorchComm, tcp_store
from xfer.api import Path
from xfer.program import as_bytes

__all__ = ["EngineHooks", "RankSetup", "RankStats", "RefitRank"]


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


LocalShard = Callable[[str], torch.Tensor]


class RefitRank:
    def __init__(self, setup: RankSetup, *, device: torch.device | None = None) -> None:
        self.setup = setup
        self.rank = setup.rank
        self.plan = setup.plan
        self.device = device or torch.device("cpu")
        self.is_engine = setup.rank >= setup.plan.trainer_world
        store = tcp_store(setup.host, setup.port, is_master=False, timeout_s=setup.timeout_s)
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
            )
            rs = Resharder(st.items, comm, path=setup.path, bucket_bytes=setup.bucket_bytes)
            self.stages.append((st, g, rs))
        self._staging: queue.LifoQueue[Staging] = queue.LifoQueue()
        for _ in range(max(1, setup.streams)):
            self._staging.put(Staging())

    # -- trainer ---------------------------------------------------------------------------
    def trainer_step(self, local: LocalShard, path: Path | None = None) -> RankStats:
        t0 = time.perf_counter()
        stats = RankStats(self.rank, "trainer")
        for st, g, rs in self.stages:
            srcs = [local(it.name) if it.src.holds(g) else None for it in st.items]
            dsts: list[torch.Tensor | None] = [None] * len(st.items)
            for i in range(st.bulk, len(st.items)):
                if st.items[i].dst.holds(g):
                    it = st.items[i]
                    dsts[i] = torch.empty(it.dst.shape, dtype=it.dtype, device=self.device)
            x = rs.run(srcs, dsts, path=path)
            stats.bulk_sent += x.bytes_sent
            stats.bulk_received += x.bytes_received
            stats.staging_bytes = max(stats.staging_bytes, rs.staging.nbytes)
            t1 = time.perf_counter()
            if g == 0:  # the stage owner: gathered misc tensors, or its own whole ones
                whole = {
                    e.name: dsts[e.gathered] if e.gathered is not None else local(e.name)
                    for e in st.misc
                }
                stats.misc_bytes += self._send_misc(st, rs, whole)
            else:
                stats.misc_bytes += sum(t.numel() for _, t in self._recv_misc(st, rs))
            stats.phases[f"stage{st.stage}.bulk"] = t1 - t0
            stats.phases[f"stage{st.stage}.misc"] = time.perf_counter() - t1
        stats.seconds = time.perf_counter() - t0
        return stats

    # -- engine ----------------------------------------------------------------------------
    def engine_step(self, hooks: EngineHooks, version: int, path: Path | None = None) -> RankStats:
        t0 = time.perf_counter()
        stats = RankStats(self.rank, "engine")
        hooks.begin(version)
        t1 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, self.setup.streams)) as pool:
            parts = list(pool.map(lambda s: self._engine_stage(s, hooks, path), self.stages))
        t2 = time.perf_counter()
        misc: list[tuple[str, torch.Tensor]] = []
        for received, sent, staging, tensors in parts:
            stats.bulk_received += received
            stats.bulk_sent += sent
            stats.staging_bytes = max(stats.staging_bytes, staging)
            misc += tensors
        stats.misc_bytes = sum(t.numel() * t.element_size() for _, t in misc)
        stats.staging_bytes = sum(s.nbytes for s in list(self._staging.queue))
        hooks.load(misc)
        t3 = time.perf_counter()
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
    ) -> tuple[int, int, int, list[tuple[str, torch.Tensor]]]:
        st, g, rs = stage
        staging = self._staging.get()
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        try:
            ctx = torch.cuda.stream(stream) if stream is not None else _Nothing()
            with ctx:
                dsts = [
                    hooks.view(it.name) if i < st.bulk and it.dst.holds(g) else None
                    for i, it in enumerate(st.items)
                ]
                x = rs.run([None] * len(st.items), dsts, stream=stream, staging=staging, path=path)
                tensors = self._recv_misc(st, rs)
            if stream is not None:
                stream.synchronize()
            return x.bytes_received, x.bytes_sent, staging.nbytes, tensors
        finally:
            self._staging.put(staging)

    # -- misc: packed broadcast from the stage owner (group rank 0) --------------------------
    def _send_misc(
        self, st: StagePlan, rs: Resharder, whole: dict[str, torch.Tensor | None]
    ) -> int:
        """Pack the stage's misc tensors into buckets, in plan order, and broadcast them."""
        for b, size in enumerate(st.buckets):
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            for e in st.misc:
                if e.bucket == b:
                    t = whole[e.name]
                    assert t is not None, f"stage owner has no whole {e.name}"
                    buf[e.offset : e.offset + e.nbytes].copy_(as_bytes(t.contiguous()).reshape(-1))
            rs.comm.broadcast(buf, 0).wait()
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
        return out


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
