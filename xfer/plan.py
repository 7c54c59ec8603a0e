"""`plan_reshard`: the pure planner. Layouts in, an immutable `Plan` out; no communication.

Model
-----
For each item (a tensor with a source and a destination layout) the source boxes tile the
tensor into *cells*, each held by a replica group; every destination rank needs its box. A
*chunk* is one non-empty (cell & destination box) region with one chosen sender:

* when the receiver is itself in the cell's replica group the chunk is a **local copy**;
* otherwise the sender is picked among the replicas, preferring replicas on the receiver's
  node when `node_of` is given, and rotating through the candidates so every replica of a
  cell sends an equal share (chunks of one cell are consecutive, so the rotation balances
  bytes within a tensor; the rotation continues across tensors).

Remote chunks are sorted by (sender, receiver, item, region): each (sender, receiver) *pair*
owns a byte stream, the concatenation of its chunks, each chunk read as the uint8 view of its
region (the last dim widened by the item size). Streams are cut into messages at arbitrary
byte offsets, so no padding is ever needed and the byte counts stay exact.

Rounds
------
Execution proceeds in ``R`` rounds; in each round every rank sends at most `bucket_bytes` and
receives at most `bucket_bytes`, with at most one message per pair (cut into parts, below).
With ``L`` the largest per-rank load (bytes in or out, local copies excluded),
``R = ceil(L / bucket_bytes)`` at least. A pair of ``B`` bytes is cut into
``m = min(R, ceil(B / S))`` near-equal messages (``S``, the smallest message worth sending
alone, is ``bucket_bytes / (2 * max peers)``), spread over the rounds from a per-pair phase.
Large pairs thus send in every round, so every sender and receiver is busy in every round
(the time of a round is its largest load), while small pairs send few messages. The
schedule is checked against the cap with an upper bound; ``R`` grows until it holds
(`xfer.rounds`).

Parts
-----
A message that spans several chunks is one region of each of several tensors, so at least
one side has to stage it (pack it into, or unpack it out of, a buffer). A chunk of at least
`part_bytes` travels as a message of its own instead (the message is cut at the chunk's
first and last byte, same round, same peer), and an executor sends it straight from, or
receives it straight into, the tensor wherever the region is contiguous on its side.
Small chunks stay together: one message for many of them beats many small messages. Both
ends cut at the same stream offsets (`Plan.part_cuts`), so they agree without talking.

Relay
-----
With ``relay`` the members of each replica class of destination ranks are cut into chains,
fed one after the other from the chain's head (`xfer.relay`); the plan then has
``R + depth`` rounds (a hop takes one round).

Scale
-----
Boxes come from `Layout.geometry` (cached per geometry) and the cell-by-box overlaps from a
cached *template* per (source geometry, destination geometry). Items sharing both are
instantiated together with numpy (`xfer.senders`, which also picks the senders), so planning
cost grows with the number of distinct geometries plus a vectorized pass over all chunks,
not with Python work per chunk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from xfer.errors import raise_if
from xfer.layout import Layout, placement_str
from xfer.relay import Relay, check_relay, choose, frozen, replica_classes
from xfer.rounds import Pairs, cut, schedule
from xfer.senders import Chunks, pick_senders

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "Chunks",
    "Pairs",
    "Plan",
    "PlanStats",
    "Relay",
    "ReshardItem",
    "check_part_bytes",
    "plan_reshard",
]

DEFAULT_BUCKET_BYTES = 256 << 20
# The default `part_bytes` is the bucket over this: a chunk worth 1/64 of a round at least
# travels alone (16 MiB in 1 GiB buckets: few cuts at full scale, each worth its message).
PART_FRACTION = 64


@dataclass(frozen=True)
class ReshardItem:
    """One tensor to move: from `src` layout to `dst` layout, elements of `dtype`."""

    src: Layout
    dst: Layout
    dtype: torch.dtype
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or "<unnamed>"

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


@dataclass(frozen=True)
class PlanStats:
    """Totals of a plan, per communicator rank (arrays of length ``world_size``)."""

    bytes_out: np.ndarray
    bytes_in: np.ndarray
    local_bytes: np.ndarray
    messages_out: np.ndarray
    messages_in: np.ndarray
    peak_send_round: np.ndarray
    peak_recv_round: np.ndarray
    rounds: int
    messages: int
    remote_bytes: int
    total_local_bytes: int
    relay_bytes: int = 0  # of `remote_bytes`, those forwarded between destination ranks

    def summary(self) -> str:
        def gib(x: float) -> str:
            return f"{x / 2**30:.3f} GiB"

        return (
            f"{self.remote_bytes / 2**20:.1f} MiB remote in {self.messages} messages over "
            f"{self.rounds} rounds ({self.relay_bytes / 2**20:.1f} MiB relayed); "
            f"{self.total_local_bytes / 2**20:.1f} MiB local; max per rank "
            f"in {gib(self.bytes_in.max(initial=0))}, out {gib(self.bytes_out.max(initial=0))}"
        )


@dataclass(frozen=True, eq=False)
class Plan:
    """An immutable reshard plan: build once with `plan_reshard`, replay at every step."""

    items: tuple[ReshardItem, ...]
    world_size: int
    bucket_bytes: int
    node_of: tuple[int, ...] | None
    rounds: int  # all rounds, relay included
    chunks: Chunks  # remote chunks from the sources (followers' boxes come by relay)
    local: Chunks
    pairs: Pairs
    relay: Relay
    direct_rounds: int  # the rounds `pairs` are spread over (`rounds` minus the relay tail)
    relay_option: bool | int | None = None
    part_bytes: int = 0  # chunks of at least this many bytes are messages of their own (0: never)
    _cache: dict[str, object] = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)

    @property
    def stats(self) -> PlanStats:
        if "stats" not in self._cache:
            self._cache["stats"] = _stats(self)
        return self._cache["stats"]  # type: ignore[return-value]

    @property
    def fingerprint(self) -> str:
        """A digest of everything the plan was built from; equal on every rank or a bug."""
        if "fingerprint" not in self._cache:
            self._cache["fingerprint"] = _fingerprint(
                self.items,
                self.world_size,
                self.bucket_bytes,
                self.node_of,
                self.relay_option,
                self.part_bytes,
            )
        return self._cache["fingerprint"]  # type: ignore[return-value]

    def part_cuts(self) -> tuple[np.ndarray, np.ndarray]:
        """(stream start of each pair, every cut) as offsets into the pairs' streams laid end
        to end: a cut is the first or one past the last byte of a chunk of at least
        `part_bytes` (sorted, unique). A message is cut where a cut falls strictly inside."""
        if "part_cuts" not in self._cache:
            nb = self.chunks.nbytes.astype(np.int64)
            start = np.cumsum(nb) - nb  # chunks are in pair order, pairs in stream order
            first = self.pairs.first.astype(np.int64)
            base = start[first] if len(nb) else np.zeros(len(first), dtype=np.int64)
            cuts = np.zeros(0, dtype=np.int64)
            if self.part_bytes > 0:
                big = nb >= self.part_bytes
                cuts = np.unique(np.concatenate([start[big], start[big] + nb[big]]))
            self._cache["part_cuts"] = (frozen(base), frozen(cuts))
        return self._cache["part_cuts"]  # type: ignore[return-value]

    def direct_messages(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every message of the sources' pairs, parts cut: (sender, receiver, round, nbytes)
        arrays."""
        pr, r = self.pairs, max(1, self.direct_rounds)
        m = pr.messages
        p_idx = np.repeat(np.arange(len(pr)), m)
        j = np.arange(int(m.sum())) - np.repeat(np.cumsum(m) - m, m)
        b = pr.nbytes[p_idx]
        lo_b, hi_b = (j * b) // m[p_idx], ((j + 1) * b) // m[p_idx]
        rnd = (pr.phase[p_idx] + (j * r) // m[p_idx]) % r
        base, cuts = self.part_cuts()
        if not len(cuts):
            return pr.sender[p_idx], pr.receiver[p_idx], rnd, hi_b - lo_b
        msg, lo, hi = cut(cuts, base[p_idx] + lo_b, base[p_idx] + hi_b)
        q = p_idx[msg]
        return pr.sender[q], pr.receiver[q], rnd[msg], hi - lo

    def message_parts(self, p: int, lo: int, hi: int) -> list[int]:
        """Stream offsets ``[lo, c_1, ..., hi]`` of pair `p`'s message ``[lo, hi)`` cut
        into its parts (`part_cuts`; the same cut as `direct_messages`)."""
        base, cuts = self.part_cuts()
        b = int(base[p])
        _, starts, _ = cut(cuts, np.array([b + lo]), np.array([b + hi]))
        return [int(x) - b for x in starts] + [hi]

    def relay_messages(
        self, direct: tuple[np.ndarray, ...] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every relay message (one per forwarder, follower and round): (sender, receiver,
        round, nbytes) arrays; `direct`: `direct_messages()` when the caller has them."""
        if "relay_messages" not in self._cache:
            rl = self.relay
            per = np.zeros((len(rl), max(1, self.direct_rounds)), dtype=np.int64)
            if len(rl):  # what each follower's head receives per round
                _, receiver, rnd, size = direct or self.direct_messages()
                row_of = np.full(self.world_size, -1, dtype=np.int64)
                heads, first = np.unique(rl.head, return_inverse=True)
                row_of[heads] = np.arange(len(heads))
                into = np.zeros((len(heads), per.shape[1]), dtype=np.int64)
                mine = row_of[receiver] >= 0
                np.add.at(into, (row_of[receiver[mine]], rnd[mine]), size[mine])
                per = into[first.reshape(-1)]
            row, t = np.nonzero(per)
            self._cache["relay_messages"] = (
                frozen(rl.forwarder[row]),
                frozen(rl.follower[row]),
                frozen(t + rl.depth[row]),
                frozen(per[row, t]),
            )
        return self._cache["relay_messages"]  # type: ignore[return-value]

    def messages(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every message of the plan, relay included: (sender, receiver, round, nbytes)."""
        direct = self.direct_messages()
        relay = self.relay_messages(direct)
        return tuple(np.concatenate([a, b]) for a, b in zip(direct, relay, strict=True))

    def pairs_of_sender(self, rank: int) -> range:
        lo, hi = np.searchsorted(self.pairs.sender, [rank, rank + 1])
        return range(int(lo), int(hi))

    def pairs_of_receiver(self, rank: int) -> np.ndarray:
        """Rows of `pairs` whose receiver is `rank`."""
        return self._rows_of("pairs_by_receiver", self.pairs.receiver, rank)

    def local_of(self, rank: int) -> np.ndarray:
        """Rows of `local` whose receiver (and sender) is `rank`."""
        return self._rows_of("local_by_receiver", self.local.receiver, rank)

    def _rows_of(self, key: str, column: np.ndarray, rank: int) -> np.ndarray:
        index = self._cache.get(key)
        if index is None:
            order = np.argsort(column, kind="stable")
            index = (order, column[order])
            self._cache[key] = index
        order, ordered = cast(tuple[np.ndarray, np.ndarray], index)
        lo, hi = np.searchsorted(ordered, [rank, rank + 1])
        return order[lo:hi]

    def __repr__(self) -> str:
        return (
            f"Plan({len(self.items)} items, world {self.world_size}, "
            f"bucket {self.bucket_bytes} B: {self.stats.summary()})"
        )


# -- validation -----------------------------------------------------------------------------
def check_items(
    items: Sequence[ReshardItem], world_size: int | None, node_of: Sequence[int] | None
) -> list[str]:
    """Every violation in the item list (pure; no tensors involved)."""
    out: list[str] = []
    for i, it in enumerate(items):
        where = f"tensor {it.label!r} (item {i})"
        if not isinstance(it.src, Layout) or not isinstance(it.dst, Layout):
            out.append(f"{where}: src and dst must be xfer.Layout")
            continue
        if not isinstance(it.dtype, torch.dtype):
            out.append(f"{where}: dtype must be a torch.dtype, got {it.dtype!r}")
        if it.src.shape != it.dst.shape:
            out.append(
                f"{where}: global shapes differ: source {list(it.src.shape)} "
                f"({it.src!r}) vs destination {list(it.dst.shape)} ({it.dst!r})"
            )
        if world_size is not None:
            for side, lay in (("source", it.src), ("destination", it.dst)):
                if lay.mesh.max_rank < world_size:
                    continue
                bad = sorted(r for r in lay.mesh.flat if r >= world_size)
                if bad:
                    out.append(
                        f"{where}: {side} mesh {lay.mesh!r} has ranks {bad} outside the "
                        f"communicator of size {world_size}"
                    )
    if node_of is not None and world_size is not None and len(node_of) != world_size:
        out.append(
            f"node_of has {len(node_of)} entries but the communicator has {world_size} ranks"
        )
    return out


def check_part_bytes(part_bytes: object) -> list[str]:
    """The problem with a `part_bytes` option (see `plan_reshard`), if any."""
    if part_bytes is None or (type(part_bytes) is int and part_bytes >= 0):
        return []
    return [
        f"part_bytes must be None (bucket / {PART_FRACTION}) or an int >= 0 (0: never cut), got {part_bytes!r}"
    ]


def plan_reshard(
    items: Sequence[ReshardItem],
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    world_size: int | None = None,
    node_of: Sequence[int] | Mapping[int, int] | None = None,
    relay: bool | int | None = None,
    part_bytes: int | None = None,
) -> Plan:
    """Plan moving every item from its source layout to its destination layout.

    Args:
        items: the tensors, in the order every rank will pass them at execution.
        bucket_bytes: the most bytes a rank sends, and the most it receives, in one round
            (each direction is staged in two buffers of this size at most).
        world_size: size of the communicator; defaults to one more than the largest rank.
        node_of: node id of each communicator rank (a sequence indexed by rank, or a
            mapping); senders on the receiver's node are preferred.
        relay: feed replicas of one destination layout from each other (see Relay above):
            None picks by the rounds it saves, False never, True always with the best number
            of chains, an int that many chains per replica class.
        part_bytes: a chunk of at least this many bytes is sent as a message of its own
            (see Parts above); None: ``bucket_bytes // 64``, 0: never.

    Pure: no communication, no CUDA. Raises one `XferError` listing every problem.
    """
    items = tuple(items)
    if world_size is None:
        world_size = 1 + max(
            (max(it.src.mesh.max_rank, it.dst.mesh.max_rank) for it in items), default=0
        )
    nodes: tuple[int, ...] | None = None
    if node_of is not None:
        if isinstance(node_of, Mapping):
            missing = [r for r in range(world_size) if r not in node_of]
            raise_if([f"node_of lacks ranks {missing[:16]}"] if missing else [])
            nodes = tuple(int(node_of[r]) for r in range(world_size))
        else:
            nodes = tuple(int(n) for n in node_of)
    problems = check_items(items, world_size, nodes)
    if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        problems.append(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
    problems += check_relay(relay)
    problems += check_part_bytes(part_bytes)
    raise_if(problems)
    if part_bytes is None:
        part_bytes = max(1, bucket_bytes // PART_FRACTION)

    width = max([1] + [it.dst.ndim for it in items])
    picked = pick_senders(items, nodes)
    classes = replica_classes(items, world_size) if relay is not False else None
    chains = choose(picked, classes, world_size, bucket_bytes, relay)
    fed = np.zeros(world_size, dtype=bool)
    fed[chains.follower] = True  # followers receive by relay, not from the sources
    local, rem = picked.chunks(width, fed, world_size, len(items))
    del picked  # the per-chunk senders of every replica: the largest temporary
    pairs, direct = schedule(rem, world_size, bucket_bytes)
    return Plan(
        items=items,
        world_size=world_size,
        bucket_bytes=bucket_bytes,
        node_of=nodes,
        rounds=direct + (chains.max_depth if direct else 0),
        chunks=rem,
        local=local,
        pairs=pairs,
        relay=chains,
        direct_rounds=direct,
        relay_option=relay,
        part_bytes=part_bytes,
    )


# -- statistics -----------------------------------------------------------------------------
def _stats(plan: Plan) -> PlanStats:
    w, rounds = plan.world_size, max(1, plan.rounds)
    s, r, rnd, size = plan.messages()
    out_r = np.zeros((w, rounds), dtype=np.int64)
    in_r = np.zeros((w, rounds), dtype=np.int64)
    np.add.at(out_r, (s, rnd), size)
    np.add.at(in_r, (r, rnd), size)
    local_bytes = np.bincount(plan.local.receiver, weights=plan.local.nbytes, minlength=w)
    return PlanStats(
        bytes_out=np.bincount(s, weights=size, minlength=w).astype(np.int64),
        bytes_in=np.bincount(r, weights=size, minlength=w).astype(np.int64),
        local_bytes=local_bytes.astype(np.int64),
        messages_out=np.bincount(s, minlength=w).astype(np.int64),
        messages_in=np.bincount(r, minlength=w).astype(np.int64),
        peak_send_round=out_r.max(axis=1),
        peak_recv_round=in_r.max(axis=1),
        rounds=plan.rounds,
        messages=len(s),
        remote_bytes=int(size.sum()),
        total_local_bytes=int(plan.local.nbytes.sum()),
        relay_bytes=int(plan.relay_messages()[3].sum()),
    )


def describe_item(it: ReshardItem) -> str:
    """A canonical one-line description (used for fingerprints and error messages)."""

    def lay(x: Layout) -> str:
        pl = ",".join(placement_str(p) for p in x.placements)
        return f"{list(x.mesh.shape)}{list(x.mesh.flat)}({pl})"

    return f"{it.name}|{it.dtype}|{list(it.src.shape)}|{lay(it.src)}->{lay(it.dst)}"


def _fingerprint(
    items: tuple[ReshardItem, ...],
    world: int,
    bucket: int,
    nodes: tuple[int, ...] | None,
    relay: bool | int | None,
    part_bytes: int = 0,
) -> str:
    h = hashlib.sha256(f"{world}|{bucket}|{nodes}|relay={relay}|parts={part_bytes}\n".encode())
    for it in items:
        h.update(describe_item(it).encode())
        h.update(b"\n")
    return h.hexdigest()[:32]
