"""A link-level model of a refit on a cluster: seconds for p2p, golden and the baseline.

Assumptions (the model's whole content; each is a knob in `Cluster`):

* Placement: each node holds `gpus_per_node` consecutive refit ranks; the trainer's ranks
  come first and the engines' ranks start on a fresh node (trainer and engines do not share
  GPUs). Two ranks on one node talk over NVLink, others over their NICs.
* Links: every GPU has a NIC and an NVLink port, each with a capacity per direction. The
  fabric between nodes is non-blocking (full bisection), so only endpoints constrain; a
  node's internal fabric may have an aggregate cap (`fabric_GBps` for point-to-point,
  `collective_GBps` for broadcasts, `sequential_collective_GBps` for broadcasts issued one at
  a time; unbounded for NVSwitch nodes, measured for local gloo).
  Concurrent flows share a link fairly, so a set of concurrent transfers takes as long as its
  busiest resource needs: max over resources of bytes / capacity.
* p2p: the plan's rounds run one after another; a round costs its busiest resource's time,
  plus `round_latency_us`, plus `msg_latency_us` per message on its busiest rank, plus the
  pack and unpack copies of its busiest rank at `copy_GBps` (overlapped with the transfer
  when `copy_overlaps`: the executor packs the next round and unpacks the previous one while
  a round is on the wire). Pipeline stages run `streams` at a time; their rounds are merged in
  lockstep (round i of every stage of the wave at once).
* golden: every non-empty source cell is broadcast to its whole stage group (a pipelined
  ring: each rank receives and forwards the cell once): bytes / link, plus the root packing
  and every receiver copying at `copy_GBps`, plus `collective_latency_us`. Every engine rank
  receives every byte, so concurrent stages share bandwidth; their latencies overlap.
* baseline (gather + broadcast): for each tensor, its cells go to the stage's first trainer
  rank, which then broadcasts the whole tensor to itself and every engine rank; tensors and
  stages one after another.
* misc buckets are broadcasts after each stage's bulk; every run first agrees on its inputs
  (one tiny gather and one tiny broadcast per stage, overlapping within a wave).
* lower bound: max over ranks of (bytes it must receive / its ingress, bytes it sends /
  its egress), from the p2p plan's per-rank bytes (a receiver gets exactly its need).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from refit.planner import RefitPlan, StagePlan
from xfer import Plan

__all__ = ["Cluster", "SimResult", "nodes_of", "simulate"]

_GB = 1e9


@dataclass(frozen=True)
class Cluster:
    name: str
    gpus_per_node: int
    nic_GBps: float  # per GPU, per direction (400 Gb/s = 50 GB/s)
    nvlink_GBps: float  # per GPU, per direction
    fabric_GBps: float | None = None  # a node's point-to-point throughput; None: no cap
    collective_GBps: float | None = None  # a node's broadcast throughput; None: fabric_GBps
    # ... when broadcasts are issued one at a time (the baseline); None: collective_GBps
    sequential_collective_GBps: float | None = None
    msg_latency_us: float = 2.0
    round_latency_us: float = 20.0
    collective_latency_us: float = 30.0
    copy_GBps: float = 1000.0  # pack/unpack copies, per rank (device memory on GPU)
    copy_overlaps: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SimResult:
    p2p: float
    golden: float
    baseline: float
    lower_bound: float
    bound_rank: int
    receive_bound: float  # max over engine ranks of bytes in / ingress alone
    rounds: int
    breakdown: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def nodes_of(trainer_world: int, engine_world: int, gpus_per_node: int) -> np.ndarray:
    """Node of every refit rank: trainer ranks fill nodes first, engines start a fresh node."""
    t_nodes = -(-trainer_world // gpus_per_node)
    tr = np.arange(trainer_world) // gpus_per_node
    en = t_nodes + np.arange(engine_world) // gpus_per_node
    return np.concatenate([tr, en]).astype(np.int64)


class _Loads:
    """Per (round, rank) traffic of one or more stages, split by link."""

    def __init__(self, rounds: int, world: int, n_nodes: int) -> None:
        z = lambda: np.zeros((rounds, world))  # noqa: E731
        self.nic_out, self.nic_in, self.nvl_out, self.nvl_in = z(), z(), z(), z()
        self.msgs, self.copies = z(), z()
        self.fabric = np.zeros((rounds, n_nodes))

    FIELDS = ("nic_out", "nic_in", "nvl_out", "nvl_in", "msgs", "copies", "fabric")

    def time(self, c: Cluster) -> np.ndarray:
        link = np.maximum.reduce(
            [
                self.nic_out / (c.nic_GBps * _GB),
                self.nic_in / (c.nic_GBps * _GB),
                self.nvl_out / (c.nvlink_GBps * _GB),
                self.nvl_in / (c.nvlink_GBps * _GB),
            ]
        ).max(axis=1)
        if c.fabric_GBps is not None:
            link = np.maximum(link, self.fabric.max(axis=1) / (c.fabric_GBps * _GB))
        copies = self.copies.max(axis=1) / (c.copy_GBps * _GB)
        body = np.maximum(link, copies) if c.copy_overlaps else link + copies
        latency = c.round_latency_us * 1e-6 + c.msg_latency_us * 1e-6 * self.msgs.max(axis=1)
        return (body + latency) * (self.msgs.max(axis=1) > 0)


def _stage_loads(st: StagePlan, plan: Plan, world: int, nodes: np.ndarray) -> _Loads:
    pr = plan.pairs
    loads = _Loads(max(1, plan.rounds), world, int(nodes.max()) + 1)
    if len(pr) == 0:
        return loads
    rounds = plan.rounds
    g2r = np.asarray(st.ranks, dtype=np.int64)
    m = pr.messages
    p_idx = np.repeat(np.arange(len(pr)), m)
    j = np.arange(len(p_idx)) - np.repeat(np.cumsum(m) - m, m)
    b = pr.nbytes[p_idx]
    size = (((j + 1) * b) // m[p_idx] - (j * b) // m[p_idx]).astype(np.float64)
    rnd = (pr.phase[p_idx] + (j * rounds) // m[p_idx]) % rounds
    s, r = g2r[pr.sender[p_idx]], g2r[pr.receiver[p_idx]]
    intra = nodes[s] == nodes[r]
    inter = ~intra

    def add(out: np.ndarray, rows: np.ndarray, cols: np.ndarray, w: np.ndarray | None) -> None:
        width = out.shape[1]
        out += np.bincount(rows * width + cols, weights=w, minlength=out.size).reshape(out.shape)

    add(loads.nic_out, rnd[inter], s[inter], size[inter])
    add(loads.nic_in, rnd[inter], r[inter], size[inter])
    add(loads.nvl_out, rnd[intra], s[intra], size[intra])
    add(loads.nvl_in, rnd[intra], r[intra], size[intra])
    add(loads.fabric, rnd[intra], nodes[s[intra]], size[intra])
    add(loads.msgs, rnd, s, None)
    add(loads.msgs, rnd, r, None)
    add(loads.copies, rnd, s, size)  # packing
    add(loads.copies, rnd, r, size)  # unpacking
    lc = plan.local  # local copies happen during the first round
    if len(lc):
        add(loads.copies, np.zeros(len(lc), np.int64), g2r[lc.receiver], lc.nbytes.astype(float))
    return loads


def _broadcast(
    nbytes: float,
    ranks: np.ndarray,
    nodes: np.ndarray,
    c: Cluster,
    copy_out: float = 0.0,
    sequential: bool = False,
) -> tuple[float, float]:
    """(bandwidth seconds, latency seconds) of a pipelined ring broadcast of `nbytes` over
    `ranks`, the root packing and each receiver copying it, plus `copy_out` bytes copied out."""
    if len(ranks) <= 1 or nbytes == 0:
        return 0.0, 0.0
    spans = len(set(nodes[ranks].tolist())) > 1
    t = nbytes / ((c.nic_GBps if spans else c.nvlink_GBps) * _GB)
    fabric = (c.sequential_collective_GBps if sequential else None) or c.collective_GBps
    fabric = fabric or c.fabric_GBps
    if fabric is not None:
        # the busiest node forwards the bytes to each of its ranks but the first
        per_node = np.bincount(nodes[ranks])
        t = max(t, float(per_node.max() - (0 if spans else 1)) * nbytes / (fabric * _GB))
    copies = (nbytes + copy_out) / (c.copy_GBps * _GB)
    return (max(t, copies) if c.copy_overlaps else t + copies), c.collective_latency_us * 1e-6


def _waves(items: Sequence[tuple[float, float]], streams: int) -> float:
    """Stages run `streams` at a time: bandwidth parts add, latency parts overlap."""
    total = 0.0
    for w in range(0, len(items), streams):
        wave = items[w : w + streams]
        total += sum(b for b, _ in wave) + max(lat for _, lat in wave)
    return total


def simulate(
    refit: RefitPlan,
    stage_plans: Sequence[Plan],
    cluster: Cluster,
    *,
    streams: int,
    nodes: np.ndarray | None = None,
) -> SimResult:
    """Seconds for one refit by each path on `cluster` (see the module docstring)."""
    world = refit.world
    if nodes is None:
        nodes = nodes_of(refit.trainer_world, world - refit.trainer_world, cluster.gpus_per_node)
    n_nodes = int(nodes.max()) + 1
    per_stage = [
        _stage_loads(st, p, world, nodes) for st, p in zip(refit.stages, stage_plans, strict=True)
    ]
    agree = (cluster.round_latency_us + cluster.collective_latency_us) * 1e-6
    # misc broadcasts of each stage, and every stage's agreement
    misc = []
    for st in refit.stages:
        parts = [_broadcast(b, np.asarray(st.ranks), nodes, cluster) for b in st.buckets]
        misc.append((sum(b for b, _ in parts), agree + sum(lat for _, lat in parts)))
    # p2p: waves of `streams` stages, rounds merged in lockstep
    p2p = _waves(misc, streams)
    rounds_total = 0
    for w in range(0, len(per_stage), streams):
        wave = per_stage[w : w + streams]
        merged = _Loads(max(x.msgs.shape[0] for x in wave), world, n_nodes)
        for x in wave:
            k = x.msgs.shape[0]
            for name in _Loads.FIELDS:
                getattr(merged, name)[:k] += getattr(x, name)
        p2p += float(merged.time(cluster).sum())
        rounds_total += int((merged.msgs.max(axis=1) > 0).sum())
    # golden: every non-empty source cell broadcast to its stage group
    golden_stages = []
    for st, (mb, ml) in zip(refit.stages, misc, strict=True):
        group = np.asarray(st.ranks)
        bw, lat = mb, ml
        for it in st.items[: st.bulk]:
            g = it.src.geometry
            out = _copy_out(it, len(group))
            for u, cell_bytes in enumerate(g.cell_numel() * it.itemsize):
                if cell_bytes:
                    b, la = _broadcast(float(cell_bytes), group, nodes, cluster, out[u])
                    bw, lat = bw + b, lat + la
        golden_stages.append((bw, lat))
    golden = _waves(golden_stages, streams)
    # baseline: gather each tensor on the stage's first trainer rank, broadcast to engines
    baseline = sum(b + lat for b, lat in misc)
    engine_ranks = np.arange(refit.trainer_world, world)
    for st in refit.stages:
        root = st.ranks[0]
        members = np.concatenate([[root], engine_ranks])
        for it in st.items[: st.bulk]:
            g = it.src.geometry
            held = g.cell_numel() * it.itemsize
            for u in range(g.ncells):
                owner = st.ranks[int(g.members[u, 0])]
                if owner != root and held[u]:
                    link = cluster.nvlink_GBps if nodes[owner] == nodes[root] else cluster.nic_GBps
                    # the root's ingress takes the cells in turn; its fabric share too
                    rate = min(link, cluster.fabric_GBps or link)
                    baseline += float(held[u]) / (rate * _GB) + cluster.round_latency_us * 1e-6
            nbytes = float(held.sum())
            b, lat = _broadcast(nbytes, members, nodes, cluster, nbytes, sequential=True)
            baseline += b + lat
    # lower bound from the plan's per-rank bytes
    need = np.zeros((4, world))
    for x in per_stage:
        need += np.stack([x.nic_in.sum(0), x.nic_out.sum(0), x.nvl_in.sum(0), x.nvl_out.sum(0)])
    caps = np.array([cluster.nic_GBps] * 2 + [cluster.nvlink_GBps] * 2)[:, None] * _GB
    per_rank = (need / caps).max(axis=0)
    receive = np.maximum(need[0] / caps[0], need[2] / caps[2])[refit.trainer_world :]
    return SimResult(
        p2p=p2p,
        golden=golden,
        baseline=baseline,
        lower_bound=float(per_rank.max()),
        bound_rank=int(per_rank.argmax()),
        receive_bound=float(receive.max(initial=0.0)),
        rounds=rounds_total,
        breakdown={"misc": sum(b + lat for b, lat in misc)},
    )


def _copy_out(it: Any, group: int) -> np.ndarray:
    """Per source cell, the most bytes of it any one rank copies into its destination."""
    g, d = it.src.geometry, it.dst.geometry
    lo = np.maximum(g.cell_starts[:, None, :], d.starts[None, :, :])
    hi = np.minimum(g.cell_stops[:, None, :], d.stops[None, :, :])
    overlap = np.prod(np.clip(hi - lo, 0, None), axis=2) * it.itemsize
    return overlap.max(axis=1).astype(np.float64) if overlap.size else np.zeros(g.ncells)
