"""Measure this machine's "links" for the simulator: gloo over 127.0.0.1 between local ranks.

On a few CPU cores, socket I/O and the packing copies compete for the same cores and memory
bandwidth, so link and copy rates measured apart do not add up to what a reshard sees.
Latencies are first measured on tiny operations: one message (a round), a group of tiny
messages to every peer (per message), a tiny broadcast; each is the median of batches of 20.
Then the model is fitted to three synthetic refits (`synthetic_specs`: the workload's stages
and ranks, but synthetic tensors, not the workload's) run through the same runtime by
`benches.localrun`: an empty one gives the runtime's fixed cost per refit (its commit), one of
many tiny tensors the round and broadcast latencies (the message latency stays as measured),
one of 4 MiB tensors the throughputs of p2p, of golden's broadcasts (to every rank) and of the
baseline's (to the engine ranks), copies included. Together they make a `Cluster` with every
rank on one node; the model then predicts the workload from it. The aggregate test's processor
time, summed over ranks, gives what moving a GB over these links costs the cores
(``aggregate_cpu_s_per_GB``), to hold the runs' processor time against.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from backends.parallel import Parallel
from benches.localrun import cpu_seconds
from benches.simulate import Cluster, SimResult, simulate
from refit.planner import RefitPlan
from refit.spec import DestParam, EngineSpec, SourceParam, TrainerSpec
from xfer import Layout, Mesh, Plan, Replicate, Shard, Transfer
from xfer.comm import Comm

__all__ = [
    "EMPTY",
    "LARGE",
    "TINY",
    "Synthetic",
    "calibrate_rank",
    "fit",
    "local_cluster",
    "merge",
    "synthetic_specs",
]

MB = 1 << 20
BATCH = 20


def _timed(comm: Comm, fn: Callable[[], Any], reps: int) -> float:
    """Median over `reps` of the time between two barriers (the slowest rank's view)."""
    times = []
    for _ in range(reps):
        comm.barrier()
        t0 = time.perf_counter()
        fn()
        comm.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _batch(fn: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        for _ in range(BATCH):
            fn()

    return run


def calibrate_rank(comm: Comm, nbytes: int = 64 * MB, reps: int = 5) -> dict[str, float]:
    """Run on every rank (world >= 2); every rank returns its view, rank 0's is used."""
    r, n = comm.rank, comm.size
    buf = torch.ones(nbytes, dtype=torch.uint8)
    half = n // 2
    tiny = [torch.zeros(1, dtype=torch.uint8) for _ in range(n)]
    peers = [p for p in range(n) if p != r]

    def pair() -> None:
        if r == 0:
            comm.send_recv([Transfer(1, buf)], []).wait()
        elif r == 1:
            comm.send_recv([], [Transfer(0, buf)]).wait()

    def pairs() -> None:
        if r < half:
            comm.send_recv([Transfer(r + half, buf)], []).wait()
        elif r < 2 * half:
            comm.send_recv([], [Transfer(r - half, buf)]).wait()

    def all_to_all() -> None:
        comm.send_recv(
            [Transfer(p, tiny[r]) for p in peers], [Transfer(p, tiny[p]) for p in peers]
        ).wait()

    def one_message() -> None:
        if r == 0:
            comm.send_recv([Transfer(1, tiny[0])], []).wait()
        elif r == 1:
            comm.send_recv([], [Transfer(0, tiny[1])]).wait()

    t_pair = _timed(comm, pair, reps)
    c0 = cpu_seconds()
    t_pairs = _timed(comm, pairs, reps)
    pairs_cpu = (cpu_seconds() - c0) / reps
    t_a2a = _timed(comm, _batch(all_to_all), reps) / BATCH
    t_one = _timed(comm, _batch(one_message), reps) / BATCH
    t_bcast = _timed(comm, _batch(lambda: comm.broadcast(tiny[0], 0).wait()), reps) / BATCH
    return {
        "pair_GBps": nbytes / t_pair / 1e9,
        "aggregate_GBps": half * nbytes / t_pairs / 1e9,
        "round_latency_us": t_one * 1e6,
        "msg_latency_us": max(0.0, t_a2a - t_one) / max(1, 2 * (n - 1) - 1) * 1e6,
        "collective_latency_us": t_bcast * 1e6,
        # this rank's processor time per run of the aggregate test (`merge` sums them)
        "pairs_cpu_s": pairs_cpu,
        "pairs_bytes": float(half * nbytes),
    }


def merge(views: list[dict[str, float]]) -> dict[str, float]:
    """The figures of a calibration from every rank's view of it: rank 0's, with the
    processor time the aggregate test took over all ranks, per GB moved
    (``aggregate_cpu_s_per_GB``: what moving a byte over these links costs the cores)."""
    first = views[0]
    cpu = sum(v["pairs_cpu_s"] for v in views)
    out = {k: v for k, v in first.items() if k not in ("pairs_cpu_s", "pairs_bytes")}
    out["aggregate_cpu_s_per_GB"] = cpu / (first["pairs_bytes"] / 1e9)
    return out


@dataclass(frozen=True)
class Synthetic:
    """A synthetic refit: per pipeline stage, `tensors` bf16 tensors of `shape`."""

    tensors: int
    shape: tuple[int, int]


def synthetic_specs(
    trainer: Parallel, engine_tp: int, kind: Synthetic
) -> tuple[TrainerSpec, EngineSpec]:
    """Descriptions with the workload's stages and ranks but synthetic tensors: per stage,
    `kind.tensors` row shards over the stage's tp (replicated over its dp) into column shards
    over the engine's TP (none at all: an empty refit, the runtime's fixed cost)."""
    tensors, shape = kind.tensors, kind.shape
    src, dst = [], []
    emesh = Mesh(list(range(engine_tp)), ("tp",))
    for s in range(trainer.pp):
        mesh = trainer.dense_mesh(s)
        for i in range(tensors):
            name = f"stage{s}.t{i}"
            src.append(
                SourceParam(
                    name, shape, torch.bfloat16, s, Layout(mesh, [Replicate(), Shard(0)], shape)
                )
            )
            dst.append(
                DestParam(name, shape, torch.bfloat16, name, Layout(emesh, [Shard(1)], shape))
            )
    stage_ranks = tuple(tuple(int(r) for r in trainer.stage_ranks(s)) for s in range(trainer.pp))
    return TrainerSpec(trainer.world, stage_ranks, tuple(src)), EngineSpec(engine_tp, tuple(dst))


# Three synthetic refits: none at all (the runtime's fixed cost per refit), many tiny tensors
# (latency-bound) and 4 MiB tensors (bandwidth-bound).
EMPTY = Synthetic(0, (1, 1))
TINY = Synthetic(32, (16, 64))
LARGE = Synthetic(16, (2048, 4096))
# each measured path and the simulator's figure that predicts it
PATHS = (("p2p", "p2p"), ("golden", "golden"), ("gather+bcast", "baseline"))
FAST = {"p2p_GBps": 1e12, "broadcast_GBps": 1e12, "baseline_broadcast_GBps": 1e12}

Run = tuple[RefitPlan, Plan, dict[str, Any]]  # a refit plan, its xfer plan, its measurement


def fit(
    figures: dict[str, float], world: int, empty: Run, tiny: Run, large: Run
) -> dict[str, float]:
    """Fit the model to the three synthetic runs.

    Fixed cost: the empty refit's p2p time is the runtime's cost per refit (the commit).
    Latency: the round latency scaled so that the model reproduces the tiny run's p2p, and
    the broadcast latency so that it reproduces its golden (the baseline gathers with the
    former and broadcasts with the latter). The message latency stays as measured on tiny
    messages: the tiny run has few messages per round, so what it adds to them is per round
    (the runtime's per-round work, ranks waking one another on shared cores), and scaling the
    message latency by it would price a plan with many messages (parts) at many rounds each.
    Bandwidth: then one throughput each for p2p and broadcasts so that the model reproduces
    the large run. Each fit is a division, since seconds = bytes / rate + latency.
    """

    def model(fig: dict[str, float], run: Run) -> SimResult:
        refit, plan, _ = run
        nodes = np.zeros(refit.world, dtype=np.int64)
        return simulate(refit, plan, local_cluster(fig, world), nodes=nodes)

    step_s = empty[2]["paths"]["p2p"]["seconds"]
    figures = {**figures, "step_latency_us": step_s * 1e6}
    lat = model({**figures, **FAST}, tiny)
    no_rounds = model({**figures, **FAST, "round_latency_us": 0.0}, tiny)
    measured = tiny[2]["paths"]
    k_round = (measured["p2p"]["seconds"] - no_rounds.p2p) / max(lat.p2p - no_rounds.p2p, 1e-9)
    k_bcast = (measured["golden"]["seconds"] - step_s) / max(lat.golden - step_s, 1e-9)
    fitted = {
        **figures,
        "round_latency_us": figures["round_latency_us"] * max(k_round, 0.0),
        "collective_latency_us": figures["collective_latency_us"] * max(k_bcast, 0.0),
        "p2p_GBps": 1.0,
        "broadcast_GBps": 1.0,
        "baseline_broadcast_GBps": 1.0,
    }
    no_bw = model({**fitted, **FAST}, large)
    at_one = model(fitted, large)
    for key, path, attr in (
        ("p2p_GBps", "p2p", "p2p"),
        ("broadcast_GBps", "golden", "golden"),
        ("baseline_broadcast_GBps", "gather+bcast", "baseline"),
    ):
        bytes_part = getattr(at_one, attr) - getattr(no_bw, attr)  # seconds at 1 GB/s
        spent = large[2]["paths"][path]["seconds"] - getattr(no_bw, attr)
        fitted[key] = bytes_part / max(spent, 1e-6)
    return fitted


def local_cluster(figures: dict[str, float], world: int) -> Cluster:
    return Cluster(
        name=f"this machine: {world} gloo ranks on 127.0.0.1 (calibrated)",
        gpus_per_node=world,
        nic_GBps=figures["pair_GBps"],
        nvlink_GBps=figures["pair_GBps"],
        fabric_GBps=figures.get("p2p_GBps"),
        collective_GBps=figures.get("broadcast_GBps"),
        baseline_collective_GBps=figures.get("baseline_broadcast_GBps"),
        msg_latency_us=figures["msg_latency_us"],
        round_latency_us=figures["round_latency_us"],
        collective_latency_us=figures["collective_latency_us"],
        step_latency_us=figures.get("step_latency_us", 0.0),
        copy_GBps=float("inf"),  # copies are inside the effective rates above
    )
