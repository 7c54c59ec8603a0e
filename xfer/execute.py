"""Executors: replay a plan (`run_p2p`) or do the broadcast reference (`run_golden`).

Both take, per item, this rank's local source tensor and local destination tensor (None where
the rank holds no such box) and only talk through a `Comm`. Validation happens before them
(`xfer.validate`); they assume their inputs are right.

p2p
    Local copies first (no staging). Then the rank's rounds, double-buffered: while round
    ``i`` is on the wire, round ``i + 1`` is packed into the other pair of staging buffers;
    round ``i`` is then unpacked. Staging is uint8: a send buffer and a receive buffer of the
    rank's largest round, twice. Every message is a slice of a staging buffer.

golden
    For each item, each non-empty source cell is broadcast from its first holder (in mesh
    order) to the whole group, through one scratch buffer sized for the largest cell (kept between runs); every
    rank whose destination box meets the cell copies the overlap. Every rank receives every
    byte, which is why it is the slow, obviously correct oracle.

Local tensors whose last dim is strided cannot be reinterpreted as bytes; they go through a
contiguous temporary (sources are copied in first, destinations are copied back at the end).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from xfer.comm import Comm, Transfer, Work
from xfer.plan import ReshardItem
from xfer.program import RankProgram, Round, as_bytes
from xfer.segments import Local, Segments, copy_in, copy_out

__all__ = ["Staging", "XferStats", "run_golden", "run_p2p"]


@dataclass(frozen=True)
class XferStats:
    """What one execution did on this rank."""

    path: str
    seconds: float
    bytes_sent: int
    bytes_received: int
    local_bytes: int
    messages_sent: int
    messages_received: int
    rounds: int
    staging_bytes: int


class Staging:
    """The p2p staging buffers (two to send, two to receive), kept between runs.

    Reusing them avoids allocating and first-touching up to four buffers of `bucket_bytes`
    every step; `release` gives the memory back (e.g. to an inference engine's KV cache).
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, int], torch.Tensor] = {}

    def get(self, key: str, index: int, nbytes: int, device: torch.device) -> torch.Tensor:
        buf = self._bufs.get((key, index))
        if buf is None or buf.numel() < nbytes or buf.device != device:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._bufs[(key, index)] = buf
        return buf[:nbytes]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._bufs.values())

    def release(self) -> None:
        self._bufs.clear()


def byte_viewable(t: torch.Tensor) -> bool:
    return t.dim() == 0 or t.numel() == 0 or t.stride(-1) == 1 or t.size(-1) <= 1


class _Locals:
    """Byte views of this rank's local shards (tensors or `Segments`), with contiguous
    temporaries for parts whose last dim is strided."""

    def __init__(self, srcs: Sequence[Local | None], dsts: Sequence[Local | None]) -> None:
        self.src: list[Local | None] = []
        self.dst: list[Local | None] = []
        self.src_bytes: list[Local | None] = []
        self.dst_bytes: list[Local | None] = []
        self._writeback: list[tuple[torch.Tensor, torch.Tensor]] = []
        for s in srcs:
            s = None if s is None else _each(s, _readable)
            self.src.append(s)
            self.src_bytes.append(None if s is None else _each(s, as_bytes))
        for d in dsts:
            d = None if d is None else _each(d, self._writable)
            self.dst.append(d)
            self.dst_bytes.append(None if d is None else _each(d, as_bytes))

    def _writable(self, t: torch.Tensor) -> torch.Tensor:
        if byte_viewable(t):
            return t
        tmp = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        self._writeback.append((t, tmp))
        return tmp

    def finish(self) -> None:
        for d, tmp in self._writeback:
            d.copy_(tmp)


def _readable(t: torch.Tensor) -> torch.Tensor:
    return t if byte_viewable(t) else t.contiguous()


def _each(x: Local, fn: Any) -> Local:
    return x.map(fn) if isinstance(x, Segments) else fn(x)


def _device_of(
    srcs: Sequence[Local | None], dsts: Sequence[Local | None], comm: Comm
) -> torch.device:
    for t in (*srcs, *dsts):
        if t is not None:
            return t.device
    dev = getattr(comm, "device", None)
    return dev if isinstance(dev, torch.device) else torch.device("cpu")


def _pack(rnd: Round, buf: torch.Tensor, loc: _Locals) -> None:
    for m in rnd.sends:
        for c in m.copies:
            src = loc.src_bytes[c.item]
            assert src is not None
            start = m.offset + c.offset
            copy_out(src, c.index, buf[start : start + c.nbytes].view(c.shape))


def _unpack(rnd: Round, buf: torch.Tensor, loc: _Locals) -> None:
    for m in rnd.recvs:
        for c in m.copies:
            dst = loc.dst_bytes[c.item]
            assert dst is not None
            start = m.offset + c.offset
            copy_in(dst, c.index, buf[start : start + c.nbytes].view(c.shape))


def run_p2p(
    program: RankProgram,
    srcs: Sequence[Local | None],
    dsts: Sequence[Local | None],
    comm: Comm,
    *,
    stream: Any = None,
    staging: Staging | None = None,
) -> XferStats:
    t0 = time.perf_counter()
    loc = _Locals(srcs, dsts)
    device = _device_of(srcs, dsts, comm)
    local_bytes = 0
    rounds = program.rounds
    staging = staging or Staging()
    sbufs = [staging.get("send", i, program.send_staging, device) for i in (0, 1)]
    rbufs = [staging.get("recv", i, program.recv_staging, device) for i in (0, 1)]
    pending: tuple[Round, torch.Tensor, Work] | None = None
    for i, rnd in enumerate(rounds):
        sb, rb = sbufs[i % 2], rbufs[i % 2]
        _pack(rnd, sb, loc)
        work = comm.send_recv(
            [Transfer(m.peer, sb[m.offset : m.offset + m.nbytes]) for m in rnd.sends],
            [Transfer(m.peer, rb[m.offset : m.offset + m.nbytes]) for m in rnd.recvs],
            stream=stream,
        )
        if i == 0:
            local_bytes = _local_copies(program, loc)
        if pending is not None:
            pending[2].wait()
            _unpack(pending[0], pending[1], loc)
        pending = (rnd, rb, work)
    if pending is not None:
        pending[2].wait()
        _unpack(pending[0], pending[1], loc)
    else:
        local_bytes = _local_copies(program, loc)
    loc.finish()
    return XferStats(
        path="p2p",
        seconds=time.perf_counter() - t0,
        bytes_sent=program.bytes_sent,
        bytes_received=program.bytes_received,
        local_bytes=local_bytes,
        messages_sent=sum(len(r.sends) for r in rounds),
        messages_received=sum(len(r.recvs) for r in rounds),
        rounds=len(rounds),
        staging_bytes=2 * (program.send_staging + program.recv_staging),
    )


def _local_copies(program: RankProgram, loc: _Locals) -> int:
    n = 0
    for lc in program.local:
        src, dst = loc.src[lc.item], loc.dst[lc.item]
        assert src is not None and dst is not None
        shape = tuple(s.stop - s.start for s in lc.dst_index)
        if isinstance(dst, torch.Tensor):
            copy_out(src, lc.src_index, dst[lc.dst_index])
        else:
            tmp = torch.empty(shape, dtype=dst.dtype, device=dst.device)
            copy_out(src, lc.src_index, tmp)
            copy_in(dst, lc.dst_index, tmp)
        n += math.prod(shape) * dst.element_size()
    return n


def run_golden(
    items: Sequence[ReshardItem],
    srcs: Sequence[Local | None],
    dsts: Sequence[Local | None],
    comm: Comm,
    *,
    stream: Any = None,
    staging: Staging | None = None,
) -> XferStats:
    t0 = time.perf_counter()
    rank = comm.rank
    loc = _Locals(srcs, dsts)
    device = _device_of(srcs, dsts, comm)
    received = sent = local = nbcast = 0
    largest = max(
        (int(it.src.geometry.cell_numel().max(initial=0)) * it.itemsize for it in items),
        default=0,
    )
    scratch = (staging or Staging()).get("golden", 0, largest, device)
    for i, it in enumerate(items):
        g = it.src.geometry
        ranks = it.src.mesh.flat
        dst_bounds = it.dst.bounds(rank)
        for u in range(g.ncells):
            lo = g.cell_starts[u].tolist()
            hi = g.cell_stops[u].tolist()
            shape = tuple(b - a for a, b in zip(lo, hi, strict=True))
            nelem = 1
            for n in shape:
                nelem *= n
            if nelem == 0:
                continue
            owner = ranks[int(g.members[u, 0])]
            buf = scratch[: nelem * it.itemsize]
            if rank == owner:
                src = loc.src_bytes[i]
                assert src is not None
                copy_out(src, tuple(slice(0, n) for n in src.shape), buf.view(src.shape))
                sent += buf.numel()
            comm.broadcast(buf, owner, stream=stream).wait()
            nbcast += 1
            if rank != owner:
                received += buf.numel()
            if dst_bounds is None:
                continue
            ov = [
                (max(a, da), min(b, db)) for a, b, (da, db) in zip(lo, hi, dst_bounds, strict=True)
            ]
            if any(a >= b for a, b in ov):
                continue
            dst = loc.dst[i]
            assert dst is not None
            cell = buf.view(it.dtype).view(shape)
            cell_index = tuple(slice(a - c, b - c) for (a, b), c in zip(ov, lo, strict=True))
            dst_index = tuple(
                slice(a - d, b - d) for (a, b), (d, _) in zip(ov, dst_bounds, strict=True)
            )
            copy_in(dst, dst_index, cell[cell_index])
            if rank == owner:
                local += math.prod(b - a for a, b in ov) * it.itemsize
    loc.finish()
    return XferStats(
        path="golden",
        seconds=time.perf_counter() - t0,
        bytes_sent=sent,
        bytes_received=received,
        local_bytes=local,
        messages_sent=0,
        messages_received=0,
        rounds=nbcast,
        staging_bytes=0,
    )
