"""Execute a refit on local rank processes: p2p vs golden vs gather + broadcast.

Every rank runs the real refit runtime (`refit.rank.RefitRank`: the groups, xfer plans and
misc broadcasts a trainer or vLLM worker runs). Trainer ranks hold their shards of
deterministic full tensors; engine ranks receive into plain buffers (`BufferEngine`) instead
of a vLLM model. The baseline, gather each full tensor on the stage's first trainer rank and
broadcast it to that rank and every engine rank, runs over the same stage groups (plus one
broadcast group per stage). Every rank times each path between two barriers; every engine
rank checks its buffers against slices of the full tensors and hashes them, so the three
paths are shown to produce identical bytes.
"""

from __future__ import annotations

import hashlib
import pickle
import statistics
import time
import zlib
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from refit.planner import RefitPlan, StagePlan
from refit.rank import RankSetup, RefitRank
from xfer import Resharder, Staging, TorchComm, Transfer, tcp_store
from xfer.comm import Comm
from xfer.local import RankPool
from xfer.program import as_bytes

__all__ = ["BufferEngine", "execute", "full_tensor"]

PATHS = ("p2p", "golden", "gather+bcast")


def full_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 7919 * seed)
    return torch.randn(shape, generator=g).to(dtype)


class BufferEngine:
    """`EngineHooks` over plain tensors: one buffer per bulk parameter this rank holds."""

    def __init__(self, plan: RefitPlan, rank: int, device: torch.device) -> None:
        self.device = device
        self.bufs: dict[str, torch.Tensor] = {}
        self.boxes: dict[str, tuple[slice, ...]] = {}
        for st in plan.stages:
            g = st.group_rank(rank)
            if g is None:
                continue
            for it in st.items[: st.bulk]:
                if it.dst.holds(g):
                    self.bufs[it.name] = torch.zeros(
                        it.dst.local_shape(g), dtype=it.dtype, device=device
                    )
                    self.boxes[it.name] = it.dst.box(g)
        self.misc: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        """Zero every buffer (between runs, outside the timed region)."""
        for b in self.bufs.values():
            b.zero_()
        self.misc = {}

    def begin(self, version: int) -> None:
        return None

    def view(self, name: str) -> torch.Tensor:
        return self.bufs[name]

    def load(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        self.misc = {n: t.clone() for n, t in tensors}

    def finish(self, version: int) -> None:
        return None

    def digest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.bufs):
            h.update(name.encode())
            h.update(as_bytes(self.bufs[name].contiguous()).cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def _gather_broadcast(
    st: StagePlan,
    g: int,
    rs: Resharder,
    bcast: Comm | None,
    local: Any,
    engine: BufferEngine | None,
    staging: Staging,
) -> None:
    """The baseline for one stage, tensor by tensor: the stage's first trainer rank gathers
    the cells (into one scratch buffer) and broadcasts the whole tensor (from another); the
    buffers are kept between runs, like the other paths' staging."""
    comm = rs.comm
    items = st.items[: st.bulk]
    most = max((int(np.prod(it.src.shape)) * it.itemsize for it in items), default=0)
    device = engine.device if engine is not None else torch.device("cpu")
    if local is not None and items and local(items[0].name) is not None:
        device = local(items[0].name).device
    scratch = staging.get("full", 0, most, device) if bcast is not None else None
    cells = staging.get("cells", 0, most, device) if g == 0 else None
    for it in items:
        geo = it.src.geometry
        owners = [it.src.mesh.flat[int(geo.members[u, 0])] for u in range(geo.ncells)]
        boxes = [
            tuple(
                slice(int(a), int(b))
                for a, b in zip(geo.cell_starts[u], geo.cell_stops[u], strict=True)
            )
            for u in range(geo.ncells)
        ]
        nbytes = int(np.prod(it.src.shape)) * it.itemsize
        full = None if scratch is None else scratch[:nbytes].view(it.dtype).view(it.src.shape)
        if g == 0:
            assert full is not None and cells is not None
            recvs, parts = [], []
            offset = 0
            for u, owner in enumerate(owners):
                if full[boxes[u]].numel() == 0:
                    continue
                if owner == 0:
                    full[boxes[u]].copy_(local(it.name))
                    continue
                shape = full[boxes[u]].shape
                n = int(np.prod(shape)) * it.itemsize
                parts.append((u, cells[offset : offset + n].view(it.dtype).view(shape)))
                recvs.append(Transfer(owner, parts[-1][1]))
                offset += n
            comm.send_recv([], recvs).wait()
            for u, part in parts:
                full[boxes[u]].copy_(part)
        elif g in owners and g < st.trainers:
            mine = [u for u, o in enumerate(owners) if o == g and it.src.box(g) == boxes[u]]
            if mine and local(it.name).numel():
                comm.send_recv([Transfer(0, local(it.name).contiguous())], []).wait()
        if bcast is not None:
            assert full is not None
            bcast.broadcast(full, 0).wait()
            if engine is not None and it.name in engine.bufs:
                engine.bufs[it.name].copy_(full[engine.boxes[it.name]])


def rank_main(comm: Comm, setup_bytes: bytes, reps: int, seed: int) -> dict[str, Any]:
    setup: RankSetup = replace(pickle.loads(setup_bytes), rank=comm.rank)
    plan = setup.plan
    device = torch.device("cpu")
    if setup.backend == "nccl":  # one GPU per local rank
        device = torch.device("cuda", comm.rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    rr = RefitRank(setup, device=device)
    rank = comm.rank
    is_engine = rank >= plan.trainer_world
    engine = BufferEngine(plan, rank, rr.device) if is_engine else None
    shards: dict[str, torch.Tensor] = {}
    fulls: dict[str, torch.Tensor] = {}
    for st, g, _ in rr.stages:
        for it in st.items:
            if (not is_engine and it.src.holds(g)) or (
                is_engine and engine and it.name in engine.bufs
            ):
                if it.name not in fulls:
                    fulls[it.name] = full_tensor(it.name, it.src.shape, it.dtype, seed)
                if not is_engine:
                    shards[it.name] = fulls[it.name][it.src.box(g)].to(device)
    # one broadcast group per stage for the baseline: the stage's first trainer rank + engines
    store = tcp_store(setup.host, setup.port, is_master=False)
    bcasts: dict[int, Comm] = {}
    for st in plan.stages:
        members = [st.ranks[0], *range(plan.trainer_world, plan.world)]
        if rank in members:
            bcasts[st.stage] = TorchComm.create(
                store,
                members.index(rank),
                len(members),
                prefix=f"{setup.prefix}/bcast{st.stage}",
                backend=setup.backend,
                device=device if setup.backend == "nccl" else None,
            )
    baseline_staging = Staging()
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    phases: dict[str, dict[str, float]] = {}
    ok: dict[str, bool] = {}
    digests: dict[str, str] = {}
    for rep in range(reps + 1):  # the first round of each path warms up
        for path in PATHS:
            if engine is not None:
                engine.reset()
            comm.barrier()
            t0 = time.perf_counter()
            if path == "gather+bcast":
                for st, g, rs in rr.stages:
                    _gather_broadcast(
                        st, g, rs, bcasts.get(st.stage), shards.get, engine, baseline_staging
                    )
            elif is_engine:
                assert engine is not None
                phases[path] = rr.engine_step(engine, rep, path).phases  # type: ignore[arg-type]
            else:
                phases[path] = rr.trainer_step(shards.__getitem__, path, rep).phases  # type: ignore[arg-type]
            comm.barrier()
            if rep:
                times[path].append(time.perf_counter() - t0)
            if engine is not None and rep == reps:  # check what the last round delivered
                ok[path] = all(
                    torch.equal(
                        as_bytes(b.contiguous()).cpu(),
                        as_bytes(fulls[n][engine.boxes[n]].contiguous()),
                    )
                    for n, b in engine.bufs.items()
                )
                digests[path] = engine.digest()
    return {
        "rank": rank,
        "engine": is_engine,
        "times": times,
        "phases": phases,
        "ok": ok,
        "digests": digests,
    }


def execute(
    plan: RefitPlan,
    *,
    streams: int,
    bucket_bytes: int,
    reps: int,
    pool: RankPool,
    seed: int = 0,
    backend: str = "gloo",
) -> dict[str, Any]:
    """Run the three paths on `pool`'s ranks (one per refit rank) and summarize; with
    ``backend="nccl"`` every rank takes a GPU of this machine."""
    store = tcp_store("127.0.0.1", 0, is_master=True)
    setup = RankSetup(
        host="127.0.0.1",
        port=store.port,
        prefix=f"bench{time.time_ns()}",
        rank=0,
        plan=plan,
        path="p2p",
        bucket_bytes=bucket_bytes,
        streams=streams,
        backend=backend,
    )
    results = pool.run(rank_main, plan.world, pickle.dumps(setup), reps, seed, timeout=1800)
    out: dict[str, Any] = {"paths": {}}
    engines = [r for r in results if r["engine"]]
    for path in PATHS:
        per_rep = [max(r["times"][path][k] for r in results) for k in range(reps)]
        out["paths"][path] = {
            "seconds": statistics.median(per_rep),
            "all_seconds": per_rep,
            "correct": all(r["ok"][path] for r in engines),
        }
    out["identical"] = all(len({r["digests"][p] for p in PATHS}) == 1 for r in engines)
    out["phases"] = {r["rank"]: r["phases"] for r in results}
    return out
