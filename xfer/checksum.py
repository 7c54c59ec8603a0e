"""Checksums of tensor regions that add up over disjoint regions (two 31-bit polynomial hashes).

A tensor is read as its byte view (`xfer.program.as_bytes`); byte ``b_i`` at row-major position
``i`` of the whole tensor's byte view contributes ``b_i * r^i``. The checksum is that sum
modulo two primes, with two bases: a pair of 31-bit polynomial hashes of the whole byte
string, about 62 bits in all. Because every byte's weight depends only on its global position,
the checksum of a receiver's box equals the sum of the checksums of the chunks its senders sent,
so a receiver verifies a reshard with two integers per sender and tensor, and no rank ever
assembles a full tensor.

What it catches: any single changed byte and any flipped bit (each weight is a unit modulo a
prime larger than 255); bytes moved to other positions (a swap of bytes ``i`` and ``j`` cancels
only if ``r^i == r^j`` for both hashes, i.e. ``i - j`` is a multiple of both bases' orders,
about 2^61); other corruption slips through with probability about 2^-62. It is an integrity
check against bugs and faulty hardware, not a MAC: whoever controls the data can forge it.

Cost: per byte two integer multiplies and adds per hash; regions are processed in blocks of
rows so temporaries stay under a few tens of MiB. Only used with ``verify=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from xfer.comm import Comm, Transfer
from xfer.layout import Layout
from xfer.plan import Plan
from xfer.program import RankProgram, as_bytes, byte_shape
from xfer.segments import Local

__all__ = ["Checksum", "box_checksum", "region_checksum", "sent_checksums", "verify"]

_PRIMES = (2147483647, 2147483629)  # 2^31 - 1 and 2^31 - 19
_BASES = (1103515245, 1664525)  # generators of large subgroups; any unit would do
_BLOCK = 1 << 21  # bytes per step: int64 temporaries of 16 MiB, products < 2^39, sums < 2^60


@dataclass(frozen=True)
class Checksum:
    """Two residues; ``a + b`` is the checksum of the union of two disjoint regions."""

    h1: int = 0
    h2: int = 0

    def __add__(self, other: object) -> Checksum:
        if isinstance(other, int) and other == 0:
            return self
        if not isinstance(other, Checksum):
            return NotImplemented
        return Checksum((self.h1 + other.h1) % _PRIMES[0], (self.h2 + other.h2) % _PRIMES[1])

    __radd__ = __add__

    def as_list(self) -> list[int]:
        return [self.h1, self.h2]

    @staticmethod
    def total(rows: torch.Tensor) -> list[Checksum]:
        """Sum a ``[senders, items, 2]`` int64 tensor of residues over senders, per item."""
        s = rows.sum(0).tolist() if rows.numel() else []
        return [Checksum(int(a) % _PRIMES[0], int(b) % _PRIMES[1]) for a, b in s]


def _pow_mod(exps: torch.Tensor, base: int, p: int) -> torch.Tensor:
    """``base ** exps % p`` elementwise (exps >= 0, int64), by binary exponentiation."""
    out = torch.ones_like(exps)
    cur = base % p
    top = int(exps.max()) if exps.numel() else 0
    bit = 0
    while (1 << bit) <= top:
        use = ((exps >> bit) & 1).bool()
        out = torch.where(use, out * cur % p, out)
        cur = cur * cur % p
        bit += 1
    return out


def region_checksum(region: torch.Tensor, start: Sequence[int], full: Sequence[int]) -> Checksum:
    """Checksum of the uint8 n-d `region` placed at `start` in a byte view of shape `full`."""
    if region.numel() == 0:
        return Checksum()
    if region.dim() == 1:
        region, start, full = region.unsqueeze(0), [0, *start], [1, *full]
    strides = [1] * len(full)
    for d in range(len(full) - 2, -1, -1):
        strides[d] = strides[d + 1] * int(full[d + 1])
    width = region.shape[-1]
    rows = region.reshape(-1, width)
    # global byte position of the first byte of each row
    base = torch.zeros(region.shape[:-1], dtype=torch.int64, device=region.device)
    for d, n in enumerate(region.shape[:-1]):
        shape = [1] * (region.dim() - 1)
        shape[d] = n
        pos = torch.arange(int(start[d]), int(start[d]) + n, dtype=torch.int64, device=base.device)
        base = base + (pos * strides[d]).view(shape)
    base = base.reshape(-1) + int(start[-1])
    out = []
    for p, r in zip(_PRIMES, _BASES, strict=True):
        col = _pow_mod(torch.arange(width, dtype=torch.int64, device=region.device), r, p)
        row_w = _pow_mod(base, r, p)
        total = 0
        step = max(1, _BLOCK // max(1, width))
        for r0 in range(0, rows.shape[0], step):
            part = rows[r0 : r0 + step].to(torch.int64)
            per_row = (part * col).sum(-1) % p  # < 2^31
            total += int((per_row * row_w[r0 : r0 + step] % p).sum()) % p
        out.append(total % p)
    return Checksum(out[0], out[1])


def _origin(layout: Layout, rank: int, itemsize: int) -> list[int]:
    b = layout.bounds(rank)
    assert b is not None
    origin = [a for a, _ in b] or [0]
    if layout.shape:
        origin[-1] *= itemsize
    return origin


def _local_checksum(
    local: Local, index: tuple[slice, ...], start: list[int], full: Sequence[int]
) -> Checksum:
    """Checksum of ``byte_view(local)[index]`` placed at `start` (segments piece by piece)."""
    if isinstance(local, torch.Tensor):
        return region_checksum(as_bytes(local.contiguous())[index], start, full)
    total = Checksum()
    for off, rows in local.map(lambda p: as_bytes(p.contiguous())).pieces(index[0]):
        part_start = [start[0] + off, *start[1:]]
        total = total + region_checksum(rows[(slice(None), *index[1:])], part_start, full)
    return total


def box_checksum(local: Local | None, layout: Layout, rank: int) -> Checksum:
    """Checksum of the box `rank` holds, in the whole tensor's byte view."""
    if local is None or not layout.holds(rank):
        return Checksum()
    size = local.element_size()
    full = byte_shape(layout.shape, size)
    shape = byte_shape(tuple(local.shape), size)
    index = tuple(slice(0, n) for n in shape)
    return _local_checksum(local, index, _origin(layout, rank, size), full)


def sent_checksums(
    plan: Plan,
    program: RankProgram,
    srcs: Sequence[Local | None],
    dsts: Sequence[Local | None] = (),
) -> dict[tuple[int, int], Checksum]:
    """Per (item, receiving peer), the checksum of every byte this rank sends it (relay
    sends: of the bytes it forwarded, read where they landed in its destination, themselves
    checked against its own senders')."""
    out: dict[tuple[int, int], Checksum] = {}
    for rnd in program.rounds:
        for m in rnd.sends:
            for c in m.copies:
                it = plan.items[c.item]
                local = (dsts if m.forward else srcs)[c.item]
                layout = it.dst if m.forward else it.src
                assert local is not None
                origin = _origin(layout, program.rank, it.itemsize)
                start = [o + s.start for o, s in zip(origin, c.index, strict=True)]
                full = byte_shape(it.src.shape, it.itemsize)
                key = (c.item, m.peer)
                out[key] = out.get(key, Checksum()) + _local_checksum(local, c.index, start, full)
    return out


def _local_checksums(
    plan: Plan, program: RankProgram, srcs: Sequence[Local | None]
) -> dict[int, Checksum]:
    """Per item, the checksum of what this rank copied locally (from its own source)."""
    out: dict[int, Checksum] = {}
    for lc in program.local:
        it = plan.items[lc.item]
        src = srcs[lc.item]
        assert src is not None
        size = it.itemsize
        index = list(lc.src_index) or [slice(0, 1)]  # a 0-d tensor's byte view is [itemsize]
        last = index[-1]
        index[-1] = slice(last.start * size, last.stop * size)
        origin = _origin(it.src, program.rank, size)
        start = [o + s.start for o, s in zip(origin, index, strict=True)]
        full = byte_shape(it.src.shape, size)
        out[lc.item] = out.get(lc.item, Checksum()) + _local_checksum(
            src, tuple(index), start, full
        )
    return out


def verify(
    comm: Comm,
    plan: Plan,
    program: RankProgram,
    srcs: Sequence[Local | None],
    dsts: Sequence[Local | None],
) -> list[str]:
    """After a reshard: every sender sends each receiver the checksums of what it sent it,
    every receiver compares its boxes; the items whose box differs, on this rank (empty when
    all match). Every rank of the plan calls it; two integers per item and peer cross the
    wire, in one grouped exchange."""
    n, rank, dev = len(plan.items), program.rank, comm.device
    sums = sent_checksums(plan, program, srcs, dsts)
    to = sorted({m.peer for r in program.rounds for m in r.sends})
    frm = sorted({m.peer for r in program.rounds for m in r.recvs})
    sends = [
        Transfer(
            p,
            torch.tensor(
                [sums.get((i, p), Checksum()).as_list() for i in range(n)],
                dtype=torch.int64,
                device=dev,
            ),
        )
        for p in to
    ]
    bufs = [torch.zeros((n, 2), dtype=torch.int64, device=dev) for _ in frm]
    comm.send_recv(sends, [Transfer(p, b) for p, b in zip(frm, bufs, strict=True)]).wait()
    want = Checksum.total(torch.stack(bufs)) if bufs else [Checksum()] * n
    local = _local_checksums(plan, program, srcs)
    bad = []
    for i, it in enumerate(plan.items):
        if not it.dst.holds(rank):
            continue
        expected = want[i] + local.get(i, Checksum())
        got = box_checksum(dsts[i], it.dst, rank)
        if got != expected:
            bad.append(f"{it.label} (expected {expected}, got {got})")
    return bad
