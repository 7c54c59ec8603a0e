"""Execute a refit on local rank processes: p2p vs golden vs gather + broadcast.

Every rank runs the real refit runtime (`refit.rank.RefitRank`, built from the JSON
`RankSetup` a driver hands it: one communicator over every refit rank, one xfer plan).
Trainer ranks hold their shards of deterministic full tensors; engine ranks receive into plain
buffers (`BufferEngine`) instead of a vLLM model. The baseline, gather each full tensor on the
first trainer rank of its pipeline stage and broadcast it to every engine rank, gathers over
the refit's communicator and broadcasts over one more communicator per stage (its root and
every engine rank: `TorchComm.create` on the refit's store, closed at the end).

Timing: every rank times each path between two barriers (after synchronizing its GPU when it
has one); a repetition's time is the slowest rank's, and a path's time the median over the
repetitions after a warm-up. Every engine rank checks what the last repetition delivered
(bulk parts and whole misc tensors) against slices of the full tensors and hashes it, so the
three paths are shown to produce identical bytes.

CPU: per path, the processor time every rank's process (all its threads, gloo's included)
spent in the same window, summed over ranks: on a machine with fewer cores than ranks the
paths are bound by it, and `busy_cores` (CPU seconds over wall seconds) shows how close.

Memory: per path, the bytes each rank held for the refit beyond the weights: p2p, what the
runtime reports (`RankStats.extra_bytes`: staging and misc tensors); golden, the runtime's
misc tensors plus the scratch buffer the golden path sizes to the largest source cell (the
runtime does not count that scratch); the baseline, its own buffers plus the misc tensors.
On a GPU also the peak of the CUDA allocator during the path above what the rank held before
its first refit (this includes the buffers the other paths keep between runs).
"""

from __future__ import annotations

import hashlib
import os
import resource
import secrets
import statistics
import threading
import time
import zlib
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from benches.baseline import gather
from harness.local import RankPool
from refit.planner import RefitPlan
from refit.rank import Gate, RefitRank
from refit.setup import RankOptions, RankSetup
from refit.spec import EngineSpec, TrainerSpec
from xfer import Staging, TorchComm, tcp_store
from xfer.comm import Comm
from xfer.program import as_bytes

__all__ = [
    "PATHS",
    "BufferEngine",
    "changed",
    "cpu_seconds",
    "execute",
    "execute_delta",
    "full_tensor",
    "host_cores",
]

PATHS = ("p2p", "golden", "gather+bcast")
HOST = "127.0.0.1"


def full_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 7919 * seed)
    return torch.randn(shape, generator=g).to(dtype)


_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def changed(name: str, full: torch.Tensor, fraction: float, step: int) -> torch.Tensor:
    """`full` after a training step that gave new bits to `fraction` of its elements
    (chosen at random, the same on every rank): the synthetic knob of the delta run."""
    if fraction <= 0 or full.numel() == 0:
        return full
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 104729 * step)
    mask = torch.rand(full.shape, generator=g) < fraction
    bits = full.view(_INT[full.element_size()])
    flip = torch.randint(1, 127, full.shape, generator=g).to(bits.dtype)
    return torch.where(mask, bits ^ flip, bits).view(full.dtype)


class BufferEngine:
    """`EngineHooks` over plain tensors: one buffer per bulk parameter this rank holds."""

    extra_bytes = 0  # installs straight into the buffers: no checkpoint-format copies

    def __init__(
        self, plan: RefitPlan, rank: int, device: torch.device, *, persistent: bool = False
    ) -> None:
        self.device = device
        self.bufs: dict[str, torch.Tensor] = {}
        self.boxes: dict[str, tuple[slice, ...]] = {}
        for it in plan.items[: plan.bulk]:
            if it.dst.holds(rank):
                shape = it.dst.local_shape(rank)
                self.bufs[it.name] = torch.zeros(shape, dtype=it.dtype, device=device)
                self.boxes[it.name] = it.dst.box(rank)
        self.misc: dict[str, torch.Tensor] = {}
        # buffers kept between refits, as an engine's live weights are (never `reset`)
        self.persistent = frozenset(self.bufs) if persistent else frozenset()

    def reset(self) -> None:
        """Zero every buffer and drop the misc tensors (between runs, outside the timing)."""
        for b in self.bufs.values():
            b.zero_()
        self.misc = {}

    def begin(self, version: int) -> None:
        return None

    def view(self, name: str) -> torch.Tensor:
        return self.bufs[name]

    def load(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        self.misc = dict(tensors)  # fresh buffers every refit: keeping them is enough

    def finish(self, version: int) -> None:
        return None

    def digest(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.bufs.items()) + sorted(self.misc.items()):
            h.update(name.encode())
            h.update(as_bytes(t.contiguous()).cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def _nbytes(it: Any) -> int:
    return int(np.prod(it.src.shape)) * it.itemsize


def _golden_scratch(plan: RefitPlan) -> int:
    """The golden path's scratch: the largest source cell (as `xfer.golden.run_golden`)."""
    return max(
        (int(it.src.geometry.cell_numel().max(initial=0)) * it.itemsize for it in plan.items),
        default=0,
    )


def gather_broadcast(
    plan: RefitPlan,
    rank: int,
    comm: Comm,
    bcasts: dict[int, Comm],
    shards: dict[str, torch.Tensor],
    engine: BufferEngine | None,
    staging: Staging,
    device: torch.device,
) -> None:
    """The baseline, tensor by tensor: the stage's root gathers the cells it lacks (into one
    buffer) and assembles the whole tensor (in another), then broadcasts it to every engine
    rank; each engine rank copies its part out (misc: keeps it whole). The buffers are kept
    between runs, like the other paths' staging."""
    stage_of = {c.name: c.stage for c in plan.report}
    for i, it in enumerate(plan.items):
        s = stage_of[it.name]
        root = plan.stage_ranks[s][0]
        nbytes = _nbytes(it)
        if nbytes == 0:
            continue
        raw = full = None  # the whole tensor, and its bytes (gloo moves no float8)
        if rank == root or engine is not None:
            raw = staging.get("full", 0, nbytes, device)
            full = raw.view(it.dtype).view(it.src.shape)
        shard = shards.get(it.name) if rank < plan.trainer_world else None
        gather(it, root, rank, comm, full, shard, lambda n: staging.get("cells", 0, n, device))
        bcast = bcasts.get(s)
        if bcast is not None:
            assert raw is not None and full is not None
            bcast.broadcast(raw, 0).wait()
            if engine is not None and i >= plan.bulk:
                engine.misc[it.name] = full.clone()
            elif engine is not None and it.name in engine.bufs:
                engine.bufs[it.name].copy_(full[engine.boxes[it.name]])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensors(
    plan: RefitPlan, rank: int, engine: BufferEngine | None, seed: int, device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The full tensors this rank checks against (engine) or slices (trainer), and the
    trainer's shards on its device."""
    fulls: dict[str, torch.Tensor] = {}
    shards: dict[str, torch.Tensor] = {}
    for i, it in enumerate(plan.items):
        wanted = (i >= plan.bulk or it.name in engine.bufs) if engine else it.src.holds(rank)
        if wanted:
            fulls[it.name] = full_tensor(it.name, it.src.shape, it.dtype, seed)
            if engine is None:
                shards[it.name] = fulls[it.name][it.src.box(rank)].to(device)
    return fulls, shards


def _broadcast_groups(
    setup: RankSetup, plan: RefitPlan, rank: int, device: torch.device
) -> dict[int, Comm]:
    """The baseline's broadcast groups this rank is in: each stage's root and every engine
    rank, one communicator per stage on the refit's store."""
    opts = setup.options
    store = tcp_store(setup.host, setup.port, is_master=False)
    engines = list(range(plan.trainer_world, plan.world))
    out: dict[int, Comm] = {}
    for s, ranks in enumerate(plan.stage_ranks):
        members = [ranks[0], *engines]
        if rank in members:
            out[s] = TorchComm.create(
                store,
                members.index(rank),
                len(members),
                prefix=f"{setup.prefix}/bcast{s}",
                backend=opts.backend,
                timeout_s=opts.timeout_s,
                device=device if opts.backend == "nccl" else None,
                host=setup.host if opts.backend == "gloo" else None,
            )
    return out


def _join(comm: Comm, setup_json: bytes) -> tuple[RankSetup, torch.device, RefitRank]:
    """This local rank's setup, device (a GPU per local rank over NCCL) and runtime."""
    setup = RankSetup.from_json(setup_json).for_rank(comm.rank)
    device = torch.device("cpu")
    if setup.options.backend == "nccl":
        device = torch.device("cuda", comm.rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return setup, device, RefitRank(setup, device=device)


def _bench_setup(
    trainer: TrainerSpec, engine: EngineSpec, replicas: int, options: RankOptions, prefix: str
) -> tuple[Any, RankSetup]:
    """A store on loopback and the setup every local rank joins (on CUDA with NCCL)."""
    world = trainer.world + engine.world * replicas
    if options.backend == "nccl":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus < world:
            raise ValueError(f"backend nccl needs a GPU per rank: {world} ranks, {gpus} GPUs")
        trainer, engine = replace(trainer, device="cuda"), replace(engine, device="cuda")
    store = tcp_store(HOST, 0, is_master=True)
    setup = RankSetup(
        host=HOST,
        port=store.port,
        prefix=f"{prefix}{time.time_ns()}",
        token=secrets.token_hex(16),
        rank=0,
        trainer=trainer,
        engine=engine,
        replicas=replicas,
        options=options,
    )
    return store, setup


def rank_main(comm: Comm, setup_json: bytes, reps: int, seed: int) -> dict[str, Any]:
    """One local rank: join the refit, time every path, check and hash what arrived."""
    rank = comm.rank
    setup, device, rr = _join(comm, setup_json)
    bcasts: dict[int, Comm] = {}
    try:
        plan = rr.plan
        engine = BufferEngine(plan, rank, device) if rank >= plan.trainer_world else None
        fulls, shards = _tensors(plan, rank, engine, seed, device)
        bcasts = _broadcast_groups(setup, plan, rank, device)
        staging = Staging()  # the baseline's buffers, kept between runs
        times: dict[str, list[float]] = {p: [] for p in PATHS}
        cpu: dict[str, list[float]] = {p: [] for p in PATHS}
        extra: dict[str, int] = {}
        cuda_extra: dict[str, int] = {}
        phases: dict[str, dict[str, float]] = {}
        ok: dict[str, bool] = {}
        digests: dict[str, str] = {}
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        version = 0  # every refit of a generation has its own
        for rep in range(reps + 1):  # the first repetition of each path warms up
            for path in PATHS:
                if engine is not None:
                    engine.reset()
                version += 1
                _sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                comm.barrier()
                c0 = cpu_seconds()
                t0 = time.perf_counter()
                if path == "gather+bcast":
                    assert rr.comm is not None
                    gather_broadcast(plan, rank, rr.comm, bcasts, shards, engine, staging, device)
                    held = engine.misc.values() if engine else ()
                    extra[path] = staging.nbytes + sum(t.numel() * t.element_size() for t in held)
                else:
                    st = (
                        rr.engine_step(engine, version, path)  # type: ignore[arg-type]
                        if engine is not None
                        else rr.trainer_step(shards.__getitem__, path, version)  # type: ignore[arg-type]
                    )
                    phases[path] = st.phases
                    extra[path] = st.extra_bytes
                    if path == "golden":  # its scratch is outside the runtime's staging
                        extra[path] += _golden_scratch(plan) - st.staging_bytes
                _sync(device)
                comm.barrier()
                if rep:
                    times[path].append(time.perf_counter() - t0)
                    cpu[path].append(cpu_seconds() - c0)
                if device.type == "cuda":
                    cuda_extra[path] = torch.cuda.max_memory_allocated(device) - base
                if engine is not None and rep == reps:  # check what the last run delivered
                    ok[path] = _check(engine, fulls)
                    digests[path] = engine.digest()
    finally:
        for b in bcasts.values():
            b.close()
        rr.close()
    return {
        "rank": rank,
        "engine": engine is not None,
        "times": times,
        "cpu": cpu,
        "extra_bytes": extra,
        "cuda_extra_bytes": cuda_extra,
        "phases": phases,
        "ok": ok,
        "digests": digests,
    }


def cpu_seconds() -> float:
    """User and system time of this process so far, all its threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def host_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


def _check(engine: BufferEngine, fulls: dict[str, torch.Tensor]) -> bool:
    same = lambda a, b: torch.equal(as_bytes(a.contiguous()).cpu(), as_bytes(b.contiguous()))  # noqa: E731
    bulk = all(same(b, fulls[n][engine.boxes[n]]) for n, b in engine.bufs.items())
    misc_names = {n for n in fulls if n not in engine.bufs}
    misc = engine.misc.keys() == misc_names and all(
        same(t, fulls[n]) for n, t in engine.misc.items()
    )
    return bulk and misc


def execute(
    trainer: TrainerSpec,
    engine: EngineSpec,
    replicas: int,
    *,
    bucket_bytes: int,
    reps: int,
    pool: RankPool,
    seed: int = 0,
    backend: str = "gloo",
    timeout_s: float = 600.0,
    part_bytes: int | None = None,
) -> dict[str, Any]:
    """Run the three paths on `pool`'s ranks (one per refit rank) and summarize; with
    ``backend="nccl"`` every rank takes a GPU of this machine. `part_bytes`: the plan's
    (`xfer.plan`; None, its default)."""
    world = trainer.world + engine.world * replicas
    options = RankOptions(
        path="p2p",
        bucket_bytes=bucket_bytes,
        backend=backend,
        timeout_s=timeout_s,
        part_bytes=part_bytes,
    )
    store, setup = _bench_setup(trainer, engine, replicas, options, "bench")
    results = pool.run(rank_main, world, setup.to_json(), reps, seed, timeout=timeout_s + 60)
    del store  # the ranks are done with it
    out: dict[str, Any] = {"paths": {}, "host_cores": host_cores()}
    engines = [r for r in results if r["engine"]]
    for path in PATHS:
        per_rep = [max(r["times"][path][k] for r in results) for k in range(reps)]
        cpu = [sum(r["cpu"][path][k] for r in results) for k in range(reps)]
        row = {
            "seconds": statistics.median(per_rep),
            "all_seconds": per_rep,
            # every rank's processor time in the window, summed, and over the wall time
            "cpu_seconds": statistics.median(cpu),
            "busy_cores": statistics.median(
                c / max(t, 1e-9) for c, t in zip(cpu, per_rep, strict=True)
            ),
            "correct": all(r["ok"][path] for r in engines),
            "extra_bytes": {
                role: max(
                    (r["extra_bytes"][path] for r in results if r["engine"] == is_e), default=0
                )
                for role, is_e in (("engine", True), ("trainer", False))
            },
        }
        if any(r["cuda_extra_bytes"] for r in results):
            row["cuda_extra_bytes"] = {
                role: max(r["cuda_extra_bytes"][path] for r in results if r["engine"] == is_e)
                for role, is_e in (("engine", True), ("trainer", False))
            }
        out["paths"][path] = row
    out["identical"] = all(len({r["digests"][p] for p in PATHS}) == 1 for r in engines)
    out["phases"] = {r["rank"]: r["phases"] for r in results}
    return out


def rank_delta(
    comm: Comm, setup_json: bytes, reps: int, fraction: float, seed: int, persistent: bool
) -> dict[str, Any]:
    """One local rank of the delta run: refits alternate dense and delta (``full_every=2``),
    each after a step that changed `fraction` of every tensor; the first pair warms up.
    Engine ranks check the last delta's result against the full tensors."""
    rank = comm.rank
    _, device, rr = _join(comm, setup_json)
    try:
        plan = rr.plan
        engine = (
            BufferEngine(plan, rank, device, persistent=persistent)
            if rank >= plan.trainer_world
            else None
        )
        fulls, shards = _tensors(plan, rank, engine, seed, device)
        rows: dict[str, list[dict[str, float]]] = {"dense": [], "delta": []}
        ok = True
        version = 0
        for rep in range(reps + 1):
            for kind in ("dense", "delta"):
                version += 1
                fulls = {n: changed(n, f, fraction, version) for n, f in fulls.items()}
                for n in shards:
                    it = next(i for i in plan.items if i.name == n)
                    shards[n].copy_(fulls[n][it.src.box(rank)])
                if engine is not None and not persistent:
                    engine.reset()  # the destinations hold nothing of the last refit
                _sync(device)
                comm.barrier()
                t0 = time.perf_counter()
                if engine is None:
                    st = rr.trainer_step(shards.__getitem__, "p2p", version)
                elif kind == "delta" and not persistent:  # received while serving, then paused
                    st = _gated_step(rr, engine, version)
                else:
                    st = rr.engine_step(engine, version, "p2p")
                _sync(device)
                seconds = time.perf_counter() - t0
                comm.barrier()
                assert st.delta == (kind == "delta"), (kind, st.delta)
                if rep:
                    rows[kind].append(
                        {
                            "seconds": seconds,
                            # the engine's pause: the whole step, or after receiving while
                            # serving only the install
                            "engine_busy_s": st.phases.get("paused", st.seconds)
                            if engine is not None
                            else 0.0,
                            "wire_bytes": st.wire_bytes,
                            "dense_bytes": st.bulk_received + st.misc_bytes
                            if engine is not None
                            else st.bulk_sent,
                            "baseline_bytes": st.baseline_bytes,
                            "extra_bytes": st.extra_bytes,
                        }
                    )
                if engine is not None and rep == reps:
                    ok = ok and _check(engine, fulls)
    finally:
        rr.close()
    return {"rank": rank, "engine": engine is not None, "rows": rows, "ok": ok}


def _gated_step(rr: RefitRank, engine: BufferEngine, version: int) -> Any:
    """An engine rank's refit as `Refitter(receive_while_serving=True)` runs it: on a thread
    of its own, the install released (`Gate.paused`) once the bytes are in."""
    gate = Gate()
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(rr.engine_step(engine, version, "p2p", gate))
        except BaseException as e:
            out.append(e)
            gate.received()

    thread = threading.Thread(target=run)
    thread.start()
    gate.arrived.wait()
    gate.paused.set()
    thread.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def execute_delta(
    trainer: TrainerSpec,
    engine: EngineSpec,
    replicas: int,
    *,
    fraction: float,
    bucket_bytes: int,
    reps: int,
    pool: RankPool,
    seed: int = 0,
    backend: str = "gloo",
    timeout_s: float = 600.0,
    persistent: bool = False,
) -> dict[str, Any]:
    """Dense vs delta refits through the real runtime, alternating in one run, every step
    changing `fraction` of each tensor's elements; delta refits are received while the
    engine would serve and installed after (`refit.rank.Gate`, as `receive_while_serving`);
    per kind the median of the slowest rank's seconds, the engines' pause (dense: the whole
    step; delta: the install), wire bytes the engines received, and memory. With
    `persistent`, the engine buffers are kept between refits (as live weights are) and
    deltas patch them in place, without engine baselines (and without receiving while
    serving, which needs them)."""
    world = trainer.world + engine.world * replicas
    options = RankOptions(
        path="p2p",
        bucket_bytes=bucket_bytes,
        backend=backend,
        timeout_s=timeout_s,
        delta=True,
        full_every=2,
    )
    store, setup = _bench_setup(trainer, engine, replicas, options, "delta")
    results = pool.run(
        rank_delta,
        world,
        setup.to_json(),
        reps,
        fraction,
        seed,
        persistent,
        timeout=timeout_s + 60,
    )
    del store
    engines = [r for r in results if r["engine"]]
    trainers = [r for r in results if not r["engine"]]
    out: dict[str, Any] = {
        "fraction": fraction,
        "persistent": persistent,
        "correct": all(r["ok"] for r in engines),
    }
    for kind in ("dense", "delta"):
        per_rep = [max(r["rows"][kind][k]["seconds"] for r in results) for k in range(reps)]
        busy = [max(r["rows"][kind][k]["engine_busy_s"] for r in engines) for k in range(reps)]
        out[kind] = {
            "seconds": statistics.median(per_rep),
            "all_seconds": per_rep,
            "pause_s": statistics.median(busy),
            "wire_bytes": sum(r["rows"][kind][-1]["wire_bytes"] for r in engines),
            "dense_bytes": sum(r["rows"][kind][-1]["dense_bytes"] for r in engines),
            "baseline_bytes": {
                "engine": max(r["rows"][kind][-1]["baseline_bytes"] for r in engines),
                "trainer": max(r["rows"][kind][-1]["baseline_bytes"] for r in trainers),
            },
            "extra_bytes": {
                "engine": max(r["rows"][kind][-1]["extra_bytes"] for r in engines),
                "trainer": max(r["rows"][kind][-1]["extra_bytes"] for r in trainers),
            },
        }
    return out
