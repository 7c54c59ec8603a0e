"""Per-rank programs: what one rank packs, sends, receives and unpacks in each round.

`build_program(plan, rank)` turns the global plan into this rank's share, still pure. Every
local tensor is read through its *byte view* (`as_bytes`): the uint8 reinterpretation with
the last dim widened by the item size (a 0-d tensor becomes ``[itemsize]``). A chunk region
of the global tensor maps to a box of that view; a message is a byte range of a pair's stream
of such boxes, and a byte range of a box splits exactly into at most ``2 * ndim - 1`` sub-boxes
(`split_range`). Sender and receiver derive their copies from the same global regions and the
same offsets, so the bytes line up by construction. A pair's message of a round may come in
parts (`Plan.part_cuts`: a large chunk alone), several messages to one peer in one round,
posted in stream order on both ends (NCCL and gloo match them in that order).

Relay (`xfer.relay.Relay`): a follower at depth ``k`` receives in round ``t + k``, from its
forwarder, one message holding every message its head receives in round ``t``, back to back
as the head's staging holds them (the head's placed receives, in order). The forwarder
received exactly those bytes, laid out the same way, one round earlier (the head from the
sources, any other forwarder as one message from the member before it), and sends them on
straight from its receive staging (`Message.forward`): no pack, no wait for them to land.
The head's copies index the head's destination box, which is the follower's and the
forwarder's box too (that is what makes them replicas), so the same indices serve all three
(a forwarded message's copies say where its bytes land in the forwarder's destination too).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from xfer.errors import XferError
from xfer.plan import Chunks, Plan

__all__ = ["Copy", "LocalCopy", "Message", "RankProgram", "Round", "as_bytes", "build_program"]


@dataclass(frozen=True)
class Copy:
    """Bytes ``[offset, offset + nbytes)`` of a message <-> ``byte_view(item)[index]``."""

    item: int
    index: tuple[slice, ...]
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Message:
    """One message to or from `peer`, at `offset` in the round's staging buffer."""

    peer: int
    offset: int
    nbytes: int
    copies: tuple[Copy, ...]
    # a relay send: the bytes this rank received in the previous round, sent on from its
    # receive staging (the copies index this rank's destination, where the same bytes land)
    forward: bool = False


@dataclass(frozen=True)
class Round:
    index: int
    sends: tuple[Message, ...]
    recvs: tuple[Message, ...]

    @property
    def send_bytes(self) -> int:
        return sum(m.nbytes for m in self.sends)

    @property
    def recv_bytes(self) -> int:
        return sum(m.nbytes for m in self.recvs)


@dataclass(frozen=True)
class LocalCopy:
    """``dst_local(item)[dst_index] = src_local(item)[src_index]`` (element coordinates)."""

    item: int
    src_index: tuple[slice, ...]
    dst_index: tuple[slice, ...]


@dataclass(frozen=True)
class RankProgram:
    rank: int
    rounds: tuple[Round, ...]
    local: tuple[LocalCopy, ...]

    @property
    def send_staging(self) -> int:
        return max((r.send_bytes for r in self.rounds), default=0)

    @property
    def recv_staging(self) -> int:
        return max((r.recv_bytes for r in self.rounds), default=0)

    @property
    def bytes_sent(self) -> int:
        return sum(r.send_bytes for r in self.rounds)

    @property
    def bytes_received(self) -> int:
        return sum(r.recv_bytes for r in self.rounds)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The uint8 view of `t` (last dim widened by the item size); `t` must have
    ``stride(-1) == 1`` or a last dim of size <= 1."""
    if t.dim() == 0:
        t = t.reshape(1)
    if t.numel() == 0:
        # empty tensors may carry any strides; their byte view is simply empty
        return torch.empty(
            byte_shape(tuple(t.shape), t.element_size()), dtype=torch.uint8, device=t.device
        )
    if t.dtype == torch.uint8:
        return t
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    if t.stride(-1) != 1 and t.size(-1) <= 1:
        t = t.as_strided((*t.shape[:-1], 1), (*t.stride()[:-1], 1))
    return t.view(torch.uint8)


def byte_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Shape of the byte view of a box of `shape`."""
    if not shape:
        return (itemsize,)
    return (*shape[:-1], shape[-1] * itemsize)


def split_range(shape: tuple[int, ...], a: int, b: int) -> list[tuple[tuple[int, int], ...]]:
    """Boxes covering the row-major linear range ``[a, b)`` of a box of `shape`, in order."""
    if a >= b:
        return []
    if len(shape) == 1:
        return [((a, b),)]
    inner = 1
    for n in shape[1:]:
        inner *= n
    i0, r0 = divmod(a, inner)
    i1, r1 = divmod(b, inner)
    rest = shape[1:]
    if i0 == i1:
        return [((i0, i0 + 1), *sub) for sub in split_range(rest, r0, r1)]
    out: list[tuple[tuple[int, int], ...]] = []
    if r0:
        out += [((i0, i0 + 1), *sub) for sub in split_range(rest, r0, inner)]
        i0 += 1
    if i1 > i0:
        out.append(((i0, i1), *((0, n) for n in rest)))
    if r1:
        out += [((i1, i1 + 1), *sub) for sub in split_range(rest, 0, r1)]
    return out


def _box_origin(plan: Plan, item: int, rank: int, side: str) -> tuple[int, ...]:
    it = plan.items[item]
    lay = it.src if side == "src" else it.dst
    b = lay.bounds(rank)
    assert b is not None, f"rank {rank} holds no {side} box of item {item}"
    return tuple(a for a, _ in b)


def _message_copies(
    plan: Plan,
    chunks: Chunks,
    rows: np.ndarray,
    starts: np.ndarray,
    lo_byte: int,
    hi_byte: int,
    rank: int,
    side: str,
    origins: dict[int, tuple[int, ...]],
) -> tuple[Copy, ...]:
    """Copies for stream bytes ``[lo_byte, hi_byte)`` of a pair (rows are its chunks)."""
    out: list[Copy] = []
    k = int(np.searchsorted(starts, lo_byte, side="right")) - 1
    while k < len(rows) and starts[k] < hi_byte:
        row = int(rows[k])
        item = int(chunks.item[row])
        it = plan.items[item]
        nd, isz = it.dst.ndim, it.itemsize
        lo = chunks.lo[row, :nd]
        hi = chunks.hi[row, :nd]
        c0 = max(lo_byte, int(starts[k])) - int(starts[k])
        c1 = min(hi_byte, int(starts[k]) + int(chunks.nbytes[row])) - int(starts[k])
        if item not in origins:
            origins[item] = _box_origin(plan, item, rank, side)
        origin = origins[item]
        region = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))
        rshape = byte_shape(region, isz)
        if nd:
            base = [int(a - o) for a, o in zip(lo, origin, strict=True)]
            base[-1] *= isz
        else:
            base = [0]
        off = int(starts[k]) + c0 - lo_byte
        for sub in split_range(rshape, c0, c1):
            index = tuple(slice(b + s, b + e) for b, (s, e) in zip(base, sub, strict=True))
            shape = tuple(e - s for s, e in sub)
            n = 1
            for x in shape:
                n *= x
            out.append(Copy(item=item, index=index, shape=shape, offset=off, nbytes=n))
            off += n
        k += 1
    return tuple(out)


def _direct(plan: Plan, rank: int, side: str) -> dict[int, list[Message]]:
    """This rank's messages to (``side="send"``) or from the sources' pairs, per round: a
    pair's message of the round, cut into its parts (a pair's parts in stream order)."""
    chunks, pairs = plan.chunks, plan.pairs
    out: dict[int, list[Message]] = {}
    origins: dict[int, tuple[int, ...]] = {}
    if side == "send":
        pair_ids, box = np.asarray(plan.pairs_of_sender(rank)), "src"
    else:
        pair_ids, box = plan.pairs_of_receiver(rank), "dst"
    for p in pair_ids.tolist():
        rows = np.arange(pairs.first[p], pairs.last[p])
        sizes = chunks.nbytes[rows]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        bounds = pairs.bounds_of(p)
        peer = int(pairs.receiver[p] if side == "send" else pairs.sender[p])
        for j, rnd in enumerate(pairs.rounds_of(p, plan.direct_rounds).tolist()):
            a, b = int(bounds[j]), int(bounds[j + 1])
            if a == b:
                continue
            cuts = plan.message_parts(p, a, b)  # a large chunk is a message of its own
            for x, y in itertools.pairwise(cuts):
                copies = _message_copies(plan, chunks, rows, starts, x, y, rank, box, origins)
                out.setdefault(rnd, []).append(Message(peer, -1, y - x, copies))
    return out


def _relayed(head: dict[int, tuple[Message, ...]], peer: int, depth: int, forward: bool) -> dict:
    """The head's receives of each round (placed: as its staging holds them) as one message
    to or from `peer`, `depth` rounds later, with the same layout: what the member before
    `peer` received a round earlier, forwarded from its receive staging as it lies. One
    message per pair and round: NCCL and gloo take one large message far better than many
    small ones."""
    out: dict[int, list[Message]] = {}
    for rnd, msgs in head.items():
        copies = tuple(
            Copy(c.item, c.index, c.shape, m.offset + c.offset, c.nbytes)
            for m in msgs
            for c in m.copies
        )
        nbytes = sum(m.nbytes for m in msgs)
        out[rnd + depth] = [Message(peer, -1, nbytes, copies, forward)]
    return out


def _check_replicas(plan: Plan, a: int, b: int) -> None:
    for it in plan.items:
        if it.dst.bounds(a) != it.dst.bounds(b):
            raise XferError(
                f"relay between ranks {a} and {b}: their boxes of {it.label!r} differ "
                f"({it.dst.bounds(a)} vs {it.dst.bounds(b)}); plan with relay=False"
            )


def build_program(plan: Plan, rank: int) -> RankProgram:
    """This rank's rounds (sends and receives with their copies) and local copies."""
    sends = _direct(plan, rank, "send")
    recvs = _direct(plan, rank, "recv")
    relay = plan.relay
    heads: dict[int, dict[int, tuple[Message, ...]]] = {}

    def head_recvs(h: int) -> dict[int, tuple[Message, ...]]:
        if h not in heads:
            got = recvs if h == rank else _direct(plan, h, "recv")
            heads[h] = {rnd: _place(msgs) for rnd, msgs in got.items()}
        return heads[h]

    row = relay.row_of_follower(rank)
    if row is not None:
        fwd, head = int(relay.forwarder[row]), int(relay.head[row])
        _check_replicas(plan, rank, fwd)
        for rnd, msgs in _relayed(head_recvs(head), fwd, int(relay.depth[row]), False).items():
            recvs.setdefault(rnd, []).extend(msgs)
    for r in relay.rows_of_forwarder(rank).tolist():
        follower, head = int(relay.follower[r]), int(relay.head[r])
        for rnd, msgs in _relayed(head_recvs(head), follower, int(relay.depth[r]), True).items():
            sends.setdefault(rnd, []).extend(msgs)
    out_rounds = []
    for rnd in sorted(set(sends) | set(recvs)):
        out_rounds.append(Round(rnd, _place(sends.get(rnd, [])), _place(recvs.get(rnd, []))))
    local = []
    for row_ in plan.local_of(rank).tolist():
        item = int(plan.local.item[row_])
        it = plan.items[item]
        nd = it.dst.ndim
        lo, hi = plan.local.lo[row_, :nd], plan.local.hi[row_, :nd]
        so, do = _box_origin(plan, item, rank, "src"), _box_origin(plan, item, rank, "dst")
        local.append(
            LocalCopy(
                item=item,
                src_index=_local_index(lo, hi, so),
                dst_index=_local_index(lo, hi, do),
            )
        )
    return RankProgram(rank=rank, rounds=tuple(out_rounds), local=tuple(local))


def _local_index(lo: np.ndarray, hi: np.ndarray, origin: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(lo, hi, origin, strict=True))


def _place(msgs: list[Message]) -> tuple[Message, ...]:
    """Lay messages out back to back in the staging buffer, ordered by peer."""
    out, off = [], 0
    for m in sorted(msgs, key=lambda m: (m.peer, m.forward)):
        out.append(Message(m.peer, off, m.nbytes, m.copies, m.forward))
        off += m.nbytes
    return tuple(out)
