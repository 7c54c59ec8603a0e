"""Replica relay, the planner's part (`xfer.plan.plan_reshard(relay=...)`): which destination
ranks are replicas of each other, how they are cut into chains, and how many chains.

Destination ranks that hold the same box of every item and no source box (engine replicas of
one layout) form a *replica class*. Without relay every member receives its box from the
source ranks, so a source rank's egress grows with the number of replicas while each
receiver's ingress does not. With relay the members of a class of ``K`` are cut into ``H``
chains (member ``q`` in chain ``q mod H`` at depth ``q // H``): only the heads (depth 0)
receive from the sources, in the ``R`` rounds scheduled above; the member at depth ``k``
receives in round ``t + k`` exactly what its head received in round ``t``, as one message
from the member before it in its chain, which sends on what it received in the round
before straight from its receive staging (`xfer.program`, `xfer.execute`). Every member
holds the same box, so the regions are the same on all three ranks. The plan has
``R + ceil(K / H) - 1`` rounds; each rank still sends and receives at most
`bucket_bytes` per round. ``relay=None`` picks ``H`` (any count from 1 to ``K``, ``K``
meaning no relay) by the rounds it leads to, ``ceil(L_H / bucket_bytes) + depth``, with
``L_H`` the largest per-rank load once followers are fed by their chains: more chains load
the sources more, fewer make the chains longer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from xfer.layout import Placement, geometry

if TYPE_CHECKING:
    from xfer.plan import ReshardItem

__all__ = ["Relay", "check_relay", "choose", "chains", "no_relay", "replica_classes"]

_GeomKey = tuple[tuple[int, ...], tuple[Placement, ...], tuple[int, ...]]


def frozen(a: np.ndarray) -> np.ndarray:
    """`a` contiguous and read-only (plans are immutable values)."""
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class Relay:
    """One row per follower (a destination rank fed by relay), sorted by follower: it receives
    from `forwarder`, at chain `depth` >= 1 below `head`, what `head` received from the
    sources, `depth` rounds later. Empty when the plan does not relay."""

    forwarder: np.ndarray
    follower: np.ndarray
    head: np.ndarray
    depth: np.ndarray

    def __len__(self) -> int:
        return int(self.follower.shape[0])

    @property
    def max_depth(self) -> int:
        return int(self.depth.max(initial=0))

    def row_of_follower(self, rank: int) -> int | None:
        i = int(np.searchsorted(self.follower, rank))
        return i if i < len(self) and int(self.follower[i]) == rank else None

    def rows_of_forwarder(self, rank: int) -> np.ndarray:
        return np.nonzero(self.forwarder == rank)[0]


def check_relay(relay: object) -> list[str]:
    """The problem with a `relay` option (see `plan_reshard`), if any."""
    if relay is None or isinstance(relay, bool) or (type(relay) is int and relay >= 1):
        return []
    return [f"relay must be None (auto), a bool or an int >= 1, got {relay!r}"]


def no_relay() -> Relay:
    z = frozen(np.zeros(0, np.int64))
    return Relay(z, z, z, z)


@functools.lru_cache(maxsize=4096)
def _box_ids(dst_key: _GeomKey) -> tuple[np.ndarray, np.ndarray]:
    """Per mesh position of a geometry: an id of its box (equal ids: equal boxes), and
    whether the box is non-empty."""
    g = geometry(*dst_key)
    boxes = np.concatenate([g.starts, g.stops], axis=1)
    _, ids = np.unique(boxes, axis=0, return_inverse=True)
    nonempty = np.asarray((g.stops > g.starts).all(axis=1), dtype=bool)
    return ids.reshape(-1).astype(np.uint64), nonempty


def replica_classes(items: Sequence[ReshardItem], world_size: int) -> np.ndarray:
    """Class of every rank (-1: none): ranks in one class hold the same destination box of
    every item, at least one non-empty, and no source box."""
    sources = np.zeros(world_size, dtype=bool)
    holds = np.zeros(world_size, dtype=bool)
    sig = np.zeros((world_size, 2), dtype=np.uint64)
    groups: dict[_GeomKey, list[int]] = {}
    for i, it in enumerate(items):
        sources[np.asarray(it.src.mesh.flat, dtype=np.int64)] = True
        groups.setdefault(it.dst.key, []).append(i)
    mult = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for key, idxs in groups.items():
            ids, nonempty = _box_ids(key)
            ranks = np.array([items[i].dst.mesh.flat for i in idxs], dtype=np.int64)  # [T, P]
            salt = _mix(np.asarray(idxs, dtype=np.uint64))  # [T]
            for h in range(2):
                word = _mix(salt[:, None] * mult[h] + ids[None, :] + np.uint64(h + 1))
                np.add.at(sig[:, h], ranks.reshape(-1), word.reshape(-1))
            holds[ranks[:, nonempty].reshape(-1)] = True
    member = holds & ~sources
    out = np.full(world_size, -1, dtype=np.int64)
    if member.sum() < 2:
        return out
    ranks = np.nonzero(member)[0]
    _, cls, counts = np.unique(sig[ranks], axis=0, return_inverse=True, return_counts=True)
    cls = cls.reshape(-1)
    keep = counts[cls] >= 2
    out[ranks[keep]] = cls[keep]
    return out


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit finalizer (splitmix64's), elementwise on uint64 arrays."""
    x = x.astype(np.uint64)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def chains(classes: np.ndarray, heads: int) -> Relay:
    """Cut every class into `heads` chains (members in rank order, member ``q`` in chain
    ``q mod heads`` at depth ``q // heads``)."""
    rows: list[tuple[int, int, int, int]] = []
    for c in np.unique(classes[classes >= 0]).tolist():
        members = np.nonzero(classes == c)[0].tolist()
        for q in range(heads, len(members)):
            rows.append((members[q - heads], members[q], members[q % heads], q // heads))
    if not rows:
        return no_relay()
    rows.sort(key=lambda r: r[1])
    cols = np.array(rows, dtype=np.int64).T
    return Relay(*(frozen(c) for c in cols))


def choose(
    picked: Any,
    classes: np.ndarray | None,
    world_size: int,
    cap: int,
    option: bool | int | None,
) -> Relay:
    """The relay chains for `option` (see `plan_reshard`), from the senders `picked` chose
    (the planner's record: `loads(position, columns, world_size)` gives each rank's remote
    bytes out per receiver position and in) and the replica `classes` of the ranks."""
    if option is False or classes is None or (classes < 0).all():
        return no_relay()
    if type(option) is int:
        return chains(classes, option)
    # remote bytes each rank sends to receivers at each position of their class (column 0:
    # receivers in no class), and receives: the loads of any number of chains follow
    position = _class_positions(classes)
    largest = int(position.max(initial=-1)) + 1
    out_by_pos, into = picked.loads(position + 1, largest + 1, world_size)

    out_upto = np.cumsum(out_by_pos, axis=1)  # [:, h]: bytes to receivers at positions < h
    in_upto = np.zeros(largest + 1)  # [h]: the most any rank at a position < h receives
    np.maximum.at(in_upto, position + 1, into)  # (position -1: in no class, column 0)
    in_upto = np.maximum.accumulate(in_upto)

    def rounds(heads: int) -> int:
        load = max(out_upto[:, heads].max(initial=0), in_upto[heads])
        depth = max(0, -(-largest // heads) - 1)
        return -(-int(load) // cap) + depth

    best, best_rounds = 0, rounds(largest)  # as many chains as members: no relay
    for h in range(1, largest):
        r = rounds(h)
        if r < best_rounds or (option is True and not best):
            best, best_rounds = h, r
    return chains(classes, best) if best else no_relay()


def _class_positions(classes: np.ndarray) -> np.ndarray:
    """Each rank's index among its class's members in rank order (-1: in no class)."""
    out = np.full(classes.shape, -1, dtype=np.int64)
    ranks = np.nonzero(classes >= 0)[0]
    if len(ranks):
        order = ranks[np.lexsort((ranks, classes[ranks]))]
        cls = classes[order]
        start = np.r_[0, np.nonzero(cls[1:] != cls[:-1])[0] + 1]
        first = np.repeat(start, np.diff(np.r_[start, len(order)]))
        out[order] = np.arange(len(order)) - first
    return out
