"""A link-level model of a refit on a cluster: seconds for p2p, golden and the baseline.

Assumptions (the model's whole content; each is a knob in `Cluster`):

* Placement: each node holds `gpus_per_node` consecutive refit ranks; the trainer's ranks
  come first and the engines' ranks start on a fresh node (trainer and engines do not share
  GPUs). Two ranks on one node talk over NVLink, others over their NICs.
* Links: every GPU has a NIC and an NVLink port, each with a capacity per direction
  (`nic_GBps`, `nvlink_GBps`: GB/s per GPU per direction). The fabric between nodes is
  non-blocking (full bisection), so only endpoints constrain; a node's internal fabric may
  have an aggregate cap (`fabric_GBps` for point-to-point, `collective_GBps` for broadcasts,
  `baseline_collective_GBps` for the baseline's broadcasts; unbounded for NVSwitch nodes,
  measured for local gloo). Concurrent flows share a link fairly, so a set of
  concurrent transfers takes as long as its busiest resource needs: max over resources of
  bytes / capacity.
* p2p: a refit is one xfer plan over every refit rank (all pipeline stages at once), relay
  included (engine replicas forwarding to each other, `xfer.plan`). Its rounds run one after
  another; a round costs its busiest resource's time (NIC and NVLink,
  each direction, and the node fabric cap), plus `round_latency_us`, plus `msg_latency_us`
  per message on its busiest rank (messages sent and received), plus the pack and unpack
  copies of its busiest rank at `copy_GBps`, overlapped with the transfer when
  `copy_overlaps` (the executor packs the next round and unpacks the previous one while a
  round is on the wire) and added to it otherwise. Every message counts as packed and
  unpacked: the runtime's zero copy (messages that are one contiguous span of the local
  tensor skip staging) makes that an overestimate. Local copies happen in the first round.
* golden: every non-empty source cell is broadcast to the whole refit world (a pipelined
  ring: every rank receives every byte once), one after another: bytes / link, plus the root
  packing the cell and the busiest receiver copying its part out at `copy_GBps` (these copies
  never overlap: each broadcast is waited on before the next cell is packed), plus
  `collective_latency_us`.
* baseline (gather + broadcast): tensor after tensor, the cells of a tensor go to the first
  trainer rank of its pipeline stage (the root; cells it holds itself are copied locally), in
  one group of messages bound by the root's ingress (NIC for cells from other nodes, NVLink
  for the rest, concurrently), plus `round_latency_us` and `msg_latency_us` per cell; the
  root assembles the tensor (copies); then it broadcasts the whole tensor to every engine
  rank (a ring over the root and the engine ranks, `baseline_collective_GBps`), and each
  engine rank copies its part out. Nothing overlaps.
* Every refit through the runtime (p2p, golden) also pays `step_latency_us` once: the ranks'
  commit in the refit's store. The baseline runs outside the runtime and does not.
* lower bound: max over ranks of (bytes it must receive / its ingress, bytes it sends / its
  egress), per link, from the p2p plan's per-rank bytes (a receiver gets exactly its need);
  receive bound: the same over engine ranks' ingress only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from refit.planner import RefitPlan
from xfer import Plan, ReshardItem

__all__ = [
    "Cluster",
    "SimResult",
    "delta_ratio",
    "nodes_of",
    "remote_cells",
    "simulate",
    "simulate_delta",
]

_GB = 1e9


@dataclass(frozen=True)
class Cluster:
    name: str
    gpus_per_node: int
    nic_GBps: float  # per GPU, per direction (400 Gb/s = 50 GB/s)
    nvlink_GBps: float  # per GPU, per direction
    fabric_GBps: float | None = None  # a node's point-to-point throughput; None: no cap
    collective_GBps: float | None = None  # a node's broadcast throughput; None: fabric_GBps
    baseline_collective_GBps: float | None = None  # ... in the baseline; None: collective_GBps
    msg_latency_us: float = 2.0
    round_latency_us: float = 20.0
    collective_latency_us: float = 30.0
    step_latency_us: float = 0.0  # once per refit through the runtime (the commit)
    copy_GBps: float = 1000.0  # pack/unpack copies, per rank (device memory on GPU)
    copy_overlaps: bool = True
    host_GBps: float = 25.0  # a GPU's copies to and from host memory (delta baselines on host)

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
    breakdown: dict[str, float]  # p2p's seconds by cause

    def to_dict(self) -> dict:
        return asdict(self)


def nodes_of(trainer_world: int, engine_world: int, gpus_per_node: int) -> np.ndarray:
    """Node of every refit rank: trainer ranks fill nodes first, engines start a fresh node."""
    t_nodes = -(-trainer_world // gpus_per_node)
    tr = np.arange(trainer_world) // gpus_per_node
    en = t_nodes + np.arange(engine_world) // gpus_per_node
    return np.concatenate([tr, en]).astype(np.int64)


class _Loads:
    """Per (round, rank) traffic of a plan, split by link."""

    def __init__(self, plan: Plan, nodes: np.ndarray) -> None:
        rounds, world = max(1, plan.rounds), plan.world_size
        z = lambda: np.zeros((rounds, world))  # noqa: E731
        self.nic_out, self.nic_in, self.nvl_out, self.nvl_in = z(), z(), z(), z()
        self.msgs, self.copies = z(), z()
        self.fabric = np.zeros((rounds, int(nodes.max()) + 1))
        # every message, relay included (engine ranks forwarding what their chain's head got)
        s, r, rnd, size = plan.messages()
        size = size.astype(np.float64)
        intra = nodes[s] == nodes[r]
        inter = ~intra
        _add(self.nic_out, rnd[inter], s[inter], size[inter])
        _add(self.nic_in, rnd[inter], r[inter], size[inter])
        _add(self.nvl_out, rnd[intra], s[intra], size[intra])
        _add(self.nvl_in, rnd[intra], r[intra], size[intra])
        _add(self.fabric, rnd[intra], nodes[s[intra]], size[intra])
        _add(self.msgs, rnd, s, None)
        _add(self.msgs, rnd, r, None)
        _add(self.copies, rnd, s, size)  # packing
        _add(self.copies, rnd, r, size)  # unpacking
        lc = plan.local  # local copies happen during the first round
        if len(lc):
            first = np.zeros(len(lc), np.int64)
            _add(self.copies, first, lc.receiver, lc.nbytes.astype(float))

    def times(self, c: Cluster) -> dict[str, np.ndarray]:
        """Per round: link seconds, exposed copy seconds, latency seconds."""
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
        exposed = np.maximum(copies - link, 0.0) if c.copy_overlaps else copies
        busy = self.msgs.max(axis=1)
        latency = (c.round_latency_us + c.msg_latency_us * busy) * 1e-6
        active = busy > 0
        return {"link": link * active, "copies": exposed * active, "latency": latency * active}


def _add(out: np.ndarray, rows: np.ndarray, cols: np.ndarray, w: np.ndarray | None) -> None:
    width = out.shape[1]
    out += np.bincount(rows * width + cols, weights=w, minlength=out.size).reshape(out.shape)


def _ring_seconds(
    nbytes: np.ndarray, ranks: np.ndarray, nodes: np.ndarray, c: Cluster, *, baseline: bool
) -> np.ndarray:
    """Bandwidth seconds of pipelined ring broadcasts of `nbytes` (each) over `ranks`."""
    if len(ranks) <= 1:
        return np.zeros_like(nbytes, dtype=np.float64)
    spans = len(np.unique(nodes[ranks])) > 1
    t = nbytes / ((c.nic_GBps if spans else c.nvlink_GBps) * _GB)
    fabric = (c.baseline_collective_GBps if baseline else None) or c.collective_GBps
    fabric = fabric or c.fabric_GBps
    if fabric is not None:
        # the busiest node forwards the bytes to each of its ranks but the first
        per_node = np.bincount(nodes[ranks])
        t = np.maximum(t, float(per_node.max() - (0 if spans else 1)) * nbytes / (fabric * _GB))
    return t


def _golden(refit: RefitPlan, nodes: np.ndarray, c: Cluster) -> float:
    everyone = np.arange(refit.world)
    total = 0.0
    for it in refit.items:
        cells = (it.src.geometry.cell_numel() * it.itemsize).astype(np.float64)
        live = cells > 0
        if not live.any():
            continue
        cells = cells[live]
        copies = (cells + _copy_out(it)[live]) / (c.copy_GBps * _GB)
        link = _ring_seconds(cells, everyone, nodes, c, baseline=False)
        total += float((link + copies).sum()) + c.collective_latency_us * 1e-6 * len(cells)
    return total


def _baseline(refit: RefitPlan, nodes: np.ndarray, c: Cluster) -> float:
    stage_of = {x.name: x.stage for x in refit.report}
    engines = np.arange(refit.trainer_world, refit.world)
    total = 0.0
    for it in refit.items:
        root = refit.stage_ranks[stage_of[it.name]][0]
        held = (it.src.geometry.cell_numel() * it.itemsize).astype(np.float64)
        remote, owners = remote_cells(it, root)
        remote &= held > 0
        if remote.any():
            owner = owners[remote]
            inter = nodes[owner] != nodes[root]
            nvl = min(c.nvlink_GBps, c.fabric_GBps or c.nvlink_GBps)
            total += max(
                float(held[remote][inter].sum()) / (c.nic_GBps * _GB),
                float(held[remote][~inter].sum()) / (nvl * _GB),
            )
            total += (c.round_latency_us + c.msg_latency_us * int(remote.sum())) * 1e-6
        nbytes = float(held.sum())
        members = np.concatenate([[root], engines])
        total += nbytes / (c.copy_GBps * _GB)  # the root assembles the tensor
        total += float(_ring_seconds(np.array([nbytes]), members, nodes, c, baseline=True)[0])
        total += _largest_part(it) / (c.copy_GBps * _GB) + c.collective_latency_us * 1e-6
    return total


def simulate(
    refit: RefitPlan, plan: Plan, cluster: Cluster, *, nodes: np.ndarray | None = None
) -> SimResult:
    """Seconds for one refit by each path on `cluster` (see the module docstring); `plan` is
    the refit's xfer plan (`plan_reshard(refit.items, world_size=refit.world, ...)`)."""
    world = refit.world
    if plan.world_size != world or len(plan.items) != len(refit.items):
        raise ValueError(
            f"the xfer plan ({len(plan.items)} items over {plan.world_size} ranks) is not the "
            f"refit's ({len(refit.items)} items over {world} ranks)"
        )
    if nodes is None:
        nodes = nodes_of(refit.trainer_world, world - refit.trainer_world, cluster.gpus_per_node)
    loads = _Loads(plan, nodes)
    parts = loads.times(cluster)
    step = cluster.step_latency_us * 1e-6
    breakdown = {k: float(v.sum()) for k, v in parts.items()} | {"step": step}
    p2p = sum(breakdown.values())
    golden = _golden(refit, nodes, cluster) + step
    baseline = _baseline(refit, nodes, cluster)
    # lower bound from the plan's per-rank bytes
    need = np.stack(
        [loads.nic_in.sum(0), loads.nic_out.sum(0), loads.nvl_in.sum(0), loads.nvl_out.sum(0)]
    )
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
        rounds=int((loads.msgs.max(axis=1) > 0).sum()),
        breakdown=breakdown,
    )


def remote_cells(it: ReshardItem, root: int) -> tuple[np.ndarray, np.ndarray]:
    """Per source cell of `it`: whether `root` lacks it (must gather it), and its owner (the
    first rank holding it: the one that sends it to `root`)."""
    g = it.src.geometry
    flat = np.asarray(it.src.mesh.flat)
    holders = np.where(g.members >= 0, flat[np.maximum(g.members, 0)], -1)
    return ~(holders == root).any(axis=1), holders[:, 0]


def _overlaps(it: ReshardItem) -> np.ndarray:
    """Bytes of each source cell (rows) inside each destination rank's box (columns)."""
    g, d = it.src.geometry, it.dst.geometry
    lo = np.maximum(g.cell_starts[:, None, :], d.starts[None, :, :])
    hi = np.minimum(g.cell_stops[:, None, :], d.stops[None, :, :])
    return np.prod(np.clip(hi - lo, 0, None), axis=2) * it.itemsize


def _copy_out(it: ReshardItem) -> np.ndarray:
    """Per source cell, the most bytes of it any one rank copies into its destination."""
    ov = _overlaps(it)
    n = it.src.geometry.ncells
    return ov.max(axis=1).astype(np.float64) if ov.size else np.zeros(n)


def _largest_part(it: ReshardItem) -> float:
    """The most bytes any destination rank holds of `it` (what it copies out of the whole)."""
    d = it.dst.geometry
    boxes = np.prod(np.clip(d.stops - d.starts, 0, None), axis=1) * it.itemsize
    return float(boxes.max(initial=0))


def delta_ratio(fraction: float, itemsize: int) -> float:
    """Encoded bytes over dense bytes for a message in which `fraction` of the words (of
    `itemsize` bytes) changed at random: the cheapest of int32 offsets + values, a bitmap +
    values, and dense (`xfer.delta`)."""
    w = itemsize
    return min(1.0, fraction * (4 + w) / w, 1 / (8 * w) + fraction)


def simulate_delta(
    refit: RefitPlan,
    plan: Plan,
    cluster: Cluster,
    fraction: float,
    *,
    baselines: str = "device",
    nodes: np.ndarray | None = None,
) -> dict[str, float]:
    """Seconds for a delta refit in which `fraction` of every tensor's elements changed.

    Model (on top of `simulate`'s): every message shrinks to `delta_ratio` of its bytes on
    the links (the message count stays: at a few percent every message has changes); one
    more round exchanges the headers (a message per peer pair); before the rounds, each
    sender reads its send bytes and its baselines to compare them (2 x its bytes at
    `copy_GBps`; with baselines in host memory the baselines cross at `host_GBps`), not
    overlapped; each receiver writes every message whole from its baselines while the
    rounds run, like the unpack copies (with host baselines: at `host_GBps`, exposed).
    `baselines`: "device" (both sides on the GPU), "host" (both in host memory) or
    "trainer-device" (trainers on the GPU, engines in host memory: an engine GPU has no room
    for a second copy of its weights)."""
    if nodes is None:
        nodes = nodes_of(
            refit.trainer_world, refit.world - refit.trainer_world, cluster.gpus_per_node
        )
    loads = _Loads(plan, nodes)
    itemsize = max((it.itemsize for it in refit.items), default=2)
    ratio = delta_ratio(fraction, min(it.itemsize for it in refit.items) if refit.items else 2)
    parts = loads.times(cluster)
    link = parts["link"] * ratio
    copies = loads.copies.max(axis=1) / (cluster.copy_GBps * _GB)
    exposed = np.maximum(copies - link, 0.0) if cluster.copy_overlaps else copies
    active = parts["latency"] > 0
    sent = (loads.nic_out + loads.nvl_out).sum(0)
    received = (loads.nic_in + loads.nvl_in).sum(0)
    peers = float(loads.msgs.sum(0).max(initial=0.0)) / max(1, int(active.sum()))
    header = (cluster.round_latency_us + cluster.msg_latency_us * peers) * 1e-6
    if baselines not in ("device", "host", "trainer-device"):
        raise ValueError(f"baselines: 'device', 'host' or 'trainer-device', got {baselines!r}")
    compare = 2 * sent.max(initial=0.0) / (cluster.copy_GBps * _GB)
    write = 0.0
    if baselines == "host":
        compare += sent.max(initial=0.0) / (cluster.host_GBps * _GB)
    if baselines in ("host", "trainer-device"):
        write = received.max(initial=0.0) / (cluster.host_GBps * _GB)
    transfer = float((link + exposed * active).sum() + parts["latency"].sum())
    total = compare + header + transfer + write + cluster.step_latency_us * 1e-6
    return {
        "fraction": fraction,
        "ratio": ratio,
        "itemsize": itemsize,
        "baselines": baselines,
        "seconds": total,
        "compare": compare,
        "header": header,
        "transfer": transfer,
        "host_write": write,
        "dense_seconds": float(sum(v.sum() for v in parts.values()))
        + cluster.step_latency_us * 1e-6,
    }
