"""Executors: replay a plan (`run_p2p`) or do the broadcast reference (`run_golden`).

Both take, per item, this rank's local source tensor and local destination tensor (None where
the rank holds no such box) and only talk through a `Comm`. Validation happens before them
(`xfer.validate`); they assume their inputs are right.

p2p
    Local copies first (no staging). Then the rank's rounds, double-buffered: while round
    ``i`` is on the wire, round ``i + 1`` is packed into the other pair of staging buffers;
    round ``i`` is then unpacked. **Zero copy**: a message whose bytes are one contiguous span
    of the local tensor (a row-sharded region, a whole expert, adjacent regions of one tensor)
    is sent straight from, or received straight into, that tensor's storage; only messages
    that are strided on a side are staged, and only on that side. A message spanning
    several tensors is staged on both sides, so the plan sends a large chunk as a message
    of its own (`Plan.part_cuts`): it goes straight wherever its region is contiguous. A
    staged message's copies that continue each other both in storage and in the message
    are merged into contiguous runs, and a round's runs go in one multi-tensor copy per
    direction (one launch for many on a GPU); strided boxes are copied one by one. Staging
    is uint8: for each direction, two buffers of the largest round's staged bytes. `XferStats` counts the bytes
    packed and unpacked (zero when every region is contiguous).

    Relay (`Message.forward`): a rank that forwards to another replica receives the rounds it
    forwards wholly staged (back to back, as the plan lays them out) and, in the next round,
    sends that receive buffer on as it lies, without packing, while it unpacks it. Its rounds
    go on the wire one after another, not two at a time: a forwarding round needs what the
    round before received, and the round after a forwarding one receives into the buffer it
    sends from (on NCCL the wait orders the streams; with an ``interrupt``, as the runtime
    runs, the host also polls for the round's end before posting the next). Its unpack
    still overlaps the next round, and two receive buffers do.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from xfer.comm import Comm, Transfer, Work
from xfer.errors import XferError
from xfer.plan import ReshardItem
from xfer.program import Copy, Message, RankProgram, Round, as_bytes
from xfer.segments import Local, Segments, copy_in, copy_out
from xfer.torch_private import copy_many

__all__ = ["Staging", "XferStats", "run_golden", "run_p2p", "staging_need"]


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
    packed_bytes: int = 0  # bytes copied into send staging (the rest went straight out)
    unpacked_bytes: int = 0  # bytes copied out of receive staging (the rest landed in place)
    wire_bytes_sent: int = 0  # payload bytes on the wire (delta runs: the encoded bytes)
    wire_bytes_received: int = 0
    kinds_sent: tuple[int, ...] = (
        0,
        0,
        0,
        0,
    )  # delta runs: messages sent same/positions/bitmap/dense
    # pack and unpack copies: strided boxes one by one, plus contiguous runs (adjacent boxes
    # merged into one), which go in one multi-tensor copy per round and direction
    copies: int = 0


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

    def __init__(
        self, srcs: Sequence[Local | None], dsts: Sequence[Local | None], *, keep: bool = False
    ) -> None:
        self._keep = keep  # temporaries start with the destination's bytes (patched in place)
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
        if self._keep:
            tmp.copy_(t)
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


def _span(local: Local | None, copies: tuple[Copy, ...], nbytes: int) -> torch.Tensor | None:
    """The message's bytes as one contiguous 1-d view of `local`'s storage, or None when they
    are not one span (strided, or regions that are not adjacent in memory)."""
    if not isinstance(local, torch.Tensor) or not copies:
        return None
    start = end = -1
    for c in copies:
        region = local[c.index]
        if not region.is_contiguous():
            return None
        if start < 0:
            start = int(region.storage_offset())
        elif int(region.storage_offset()) != end:
            return None
        end = int(region.storage_offset()) + c.nbytes
    if end - start != nbytes:
        return None
    return torch.as_strided(local, (nbytes,), (1,), start)


@dataclass(frozen=True)
class _Run:
    """Bytes ``[offset, offset + nbytes)`` of a message <-> the 1-d `span` of a local tensor's
    storage: consecutive copies that are adjacent both in the message and in storage, moved
    by one copy instead of one per box."""

    span: torch.Tensor
    offset: int
    nbytes: int


@dataclass
class _Direct:
    """Per message of a round: its direct view (None: staged), and the staged bytes; per
    staged message, its copies with adjacent ones merged into runs (`pieces`)."""

    views: list[torch.Tensor | None]
    staged: int
    pieces: list[list[_Run | Copy]]

    @property
    def copies(self) -> int:
        """Copy launches to pack or unpack the round's staged messages."""
        return sum(len(p) for p in self.pieces)


def _directs(
    msgs: tuple[Message, ...], side: list[Local | None], *, stage_all: bool = False
) -> _Direct:
    """`side`: the tensors messages read or write; `stage_all`: no message goes straight
    to or from storage (a round this rank forwards). A forwarded send has no view and no
    pieces: its buffer is the previous round's receive staging."""
    views: list[torch.Tensor | None] = []
    pieces: list[list[_Run | Copy]] = []
    staged = 0
    for m in msgs:
        if m.forward:
            views.append(None)
            pieces.append([])
            continue
        items = {c.item for c in m.copies}
        local = side[next(iter(items))] if len(items) == 1 and not stage_all else None
        v = _span(local, m.copies, m.nbytes)
        views.append(v)
        pieces.append([] if v is not None else _runs(m, side))
        if v is None:
            staged += m.nbytes
    return _Direct(views, staged, pieces)


def _runs(m: Message, side: list[Local | None]) -> list[_Run | Copy]:
    """The message's copies, consecutive ones merged where they continue each other in a
    plain tensor's storage and in the message."""
    out: list[_Run | Copy] = []
    run: tuple[torch.Tensor, int, int, int] | None = None  # tensor, start, end, message offset

    def close() -> None:
        if run is not None:
            t, start, end, at = run
            out.append(_Run(torch.as_strided(t, (end - start,), (1,), start), at, end - start))

    for c in m.copies:
        t = side[c.item]
        region = t[c.index] if isinstance(t, torch.Tensor) else None
        if not isinstance(t, torch.Tensor) or region is None or not region.is_contiguous():
            close()
            run = None
            out.append(c)
            continue
        offset = int(region.storage_offset())
        if (
            run is not None
            and run[0] is t
            and offset == run[2]
            and c.offset == run[3] + run[2] - run[1]
        ):
            run = (t, run[1], run[2] + c.nbytes, run[3])
            continue
        close()
        run = (t, offset, offset + c.nbytes, c.offset)
    close()
    return out


def _pack(
    rnd: Round,
    direct: _Direct,
    buf: torch.Tensor,
    loc: _Locals,
    wanted: Sequence[bool] | None = None,
    forwarded: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Each send's buffer: its direct view, `forwarded` (a relay send: the previous round's
    receive staging, as it lies), or its bytes packed into `buf` (with `wanted`, only the
    wanted messages' bytes are copied; the others keep their place in `buf`)."""
    out, at = [], 0
    into_runs: list[torch.Tensor] = []
    from_runs: list[torch.Tensor] = []
    side = loc.src_bytes
    for j, (m, v) in enumerate(zip(rnd.sends, direct.views, strict=True)):
        if m.forward:
            assert forwarded is not None and forwarded.numel() == m.nbytes
            out.append(forwarded)
            continue
        if v is not None:
            out.append(v)
            continue
        for c in direct.pieces[j] if wanted is None or wanted[j] else ():
            into = buf[at + c.offset : at + c.offset + c.nbytes]
            if isinstance(c, _Run):
                into_runs.append(into)
                from_runs.append(c.span)
                continue
            src = side[c.item]
            assert src is not None
            copy_out(src, c.index, into.view(c.shape))
        out.append(buf[at : at + m.nbytes])
        at += m.nbytes
    copy_many(into_runs, from_runs)  # the contiguous runs of the round, batched
    return out


def _recv_buffers(rnd: Round, direct: _Direct, buf: torch.Tensor) -> list[torch.Tensor]:
    out, at = [], 0
    for m, v in zip(rnd.recvs, direct.views, strict=True):
        if v is not None:
            out.append(v)
        else:
            out.append(buf[at : at + m.nbytes])
            at += m.nbytes
    return out


def _unpack(rnd: Round, direct: _Direct, bufs: Sequence[torch.Tensor | None], loc: _Locals) -> None:
    """Copy each staged message out of its buffer (None: nothing to unpack here)."""
    into_runs: list[torch.Tensor] = []
    from_runs: list[torch.Tensor] = []
    for v, b, pieces in zip(direct.views, bufs, direct.pieces, strict=True):
        if v is not None or b is None:
            continue  # landed in place
        for c in pieces:
            part = b[c.offset : c.offset + c.nbytes]
            if isinstance(c, _Run):
                into_runs.append(c.span)
                from_runs.append(part)
                continue
            dst = loc.dst_bytes[c.item]
            assert dst is not None
            copy_in(dst, c.index, part.view(c.shape))
    copy_many(into_runs, from_runs)  # the contiguous runs of the round, batched


@dataclass
class Prepared:
    """What a p2p run sets up before its first round: byte views of the local tensors,
    per round which messages go straight from or into storage, and the staging buffers."""

    loc: _Locals
    device: torch.device
    sends: list[_Direct]
    recvs: list[_Direct]
    send_staging: int
    recv_staging: int
    sbufs: list[torch.Tensor]
    rbufs: list[torch.Tensor]

    def stats(
        self, path: str, t0: float, program: RankProgram, local_bytes: int, **extra: Any
    ) -> XferStats:
        """What the run did (`extra`: the fields a path fills itself, e.g. wire bytes)."""
        rounds = program.rounds
        extra.setdefault("staging_bytes", 2 * (self.send_staging + self.recv_staging))
        return XferStats(
            path=path,
            seconds=time.perf_counter() - t0,
            bytes_sent=program.bytes_sent,
            bytes_received=program.bytes_received,
            local_bytes=local_bytes,
            messages_sent=sum(len(r.sends) for r in rounds),
            messages_received=sum(len(r.recvs) for r in rounds),
            rounds=len(rounds),
            packed_bytes=sum(d.staged for d in self.sends),
            unpacked_bytes=sum(d.staged for d in self.recvs),
            copies=sum(d.copies for d in (*self.sends, *self.recvs)),
            **extra,
        )


def _fed_rounds(program: RankProgram) -> set[int]:
    """Positions of the rounds whose receives a forwarding send of the next round sends on;
    refuses a program where that round is missing or does not hold exactly those bytes."""
    fed = set()
    for i, rnd in enumerate(program.rounds):
        for m in rnd.sends:
            if not m.forward:
                continue
            prev = program.rounds[i - 1] if i else None
            if prev is None or prev.index != rnd.index - 1 or prev.recv_bytes != m.nbytes:
                got = "nothing" if prev is None else f"{prev.recv_bytes} B in round {prev.index}"
                raise XferError(
                    f"rank {program.rank}: round {rnd.index} forwards {m.nbytes} B to rank "
                    f"{m.peer}, but the round before received {got} (a relay send forwards "
                    "the whole previous round)"
                )
            fed.add(i - 1)
    return fed


def _round_directs(
    program: RankProgram, src: list[Local | None], dst: list[Local | None]
) -> tuple[list[_Direct], list[_Direct]]:
    """Per round, what its sends and its receives stage (`src`, `dst`: byte views)."""
    fed = _fed_rounds(program)
    sends = [_directs(r.sends, src) for r in program.rounds]
    recvs = [_directs(r.recvs, dst, stage_all=i in fed) for i, r in enumerate(program.rounds)]
    return sends, recvs


def staging_need(program: RankProgram, src: list[Local | None], dst: list[Local | None]) -> int:
    """The staging bytes a p2p run of `program` allocates over these byte views of the local
    tensors (`meta` tensors will do): two buffers of the largest round's staged sends and two
    of its staged receives."""
    sends, recvs = _round_directs(program, src, dst)
    send = max((d.staged for d in sends), default=0)
    recv = max((d.staged for d in recvs), default=0)
    return 2 * (send + recv)


def prepare(
    program: RankProgram,
    srcs: Sequence[Local | None],
    dsts: Sequence[Local | None],
    comm: Comm,
    staging: Staging,
    *,
    keep: bool = False,
) -> Prepared:
    """Set up a p2p run of `program` (`keep`: see `_Locals`)."""
    loc = _Locals(srcs, dsts, keep=keep)
    device = _device_of(srcs, dsts, comm)
    sends, recvs = _round_directs(program, loc.src_bytes, loc.dst_bytes)
    send_staging = max((d.staged for d in sends), default=0)
    recv_staging = max((d.staged for d in recvs), default=0)
    sbufs = [staging.get("send", i, send_staging, device) for i in (0, 1)]
    rbufs = [staging.get("recv", i, recv_staging, device) for i in (0, 1)]
    return Prepared(loc, device, sends, recvs, send_staging, recv_staging, sbufs, rbufs)


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
    run = prepare(program, srcs, dsts, comm, staging or Staging())
    rounds = program.rounds

    def post(i: int) -> tuple[list[torch.Tensor], Work]:
        rnd = rounds[i]
        fed = rounds[i - 1].recv_bytes if i else 0
        forwarded = run.rbufs[(i - 1) % 2][:fed]  # all staged there (`_fed_rounds`)
        out = _pack(rnd, run.sends[i], run.sbufs[i % 2], run.loc, forwarded=forwarded)
        into = _recv_buffers(rnd, run.recvs[i], run.rbufs[i % 2])
        work = comm.send_recv(
            [Transfer(m.peer, b) for m, b in zip(rnd.sends, out, strict=True)],
            [Transfer(m.peer, b) for m, b in zip(rnd.recvs, into, strict=True)],
            stream=stream,
        )
        return into, work

    def land(i: int, into: list[torch.Tensor]) -> None:
        _unpack(rounds[i], run.recvs[i], into, run.loc)

    local_bytes = pipeline(program, run.loc, post, land)
    return run.stats(
        "p2p",
        t0,
        program,
        local_bytes,
        wire_bytes_sent=program.bytes_sent,
        wire_bytes_received=program.bytes_received,
        kinds_sent=(0, 0, 0, sum(len(r.sends) for r in rounds)),
    )


def pipeline(
    program: RankProgram,
    loc: _Locals,
    post: Callable[[int], tuple[Any, Work]],
    land: Callable[[int, Any], None],
) -> int:
    """Run `program`'s rounds double-buffered: post round ``i`` (`post` packs it and starts
    its transfer), make the local copies while round 0 is on the wire, then wait for round
    ``i - 1`` and `land` it (unpack) while round ``i`` is in flight. Around a round that
    forwards (relay), round ``i - 1`` is waited for before round ``i`` is posted (and landed
    after): a forwarding round sends what the round before received, and the round after
    it receives into the buffer it sends from. Writes back the destinations' temporaries at
    the end; returns the local bytes copied."""
    local_bytes = 0
    pending: tuple[int, Any, Work] | None = None
    forwarding = [any(m.forward for m in r.sends) for r in program.rounds]
    for i in range(len(program.rounds)):
        waited = False
        if pending is not None and (forwarding[i] or forwarding[i - 1]):
            pending[2].wait()
            waited = True
        received, work = post(i)
        if i == 0:
            local_bytes = _local_copies(program, loc)
        if pending is not None:
            if not waited:
                pending[2].wait()
            land(pending[0], pending[1])
        pending = (i, received, work)
    if pending is not None:
        pending[2].wait()
        land(pending[0], pending[1])
    else:
        local_bytes = _local_copies(program, loc)
    loc.finish()
    return local_bytes


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
        wire_bytes_sent=sent,
        wire_bytes_received=received,
    )
