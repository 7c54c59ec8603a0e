"""How a round's messages meet the local tensors: straight from or into storage, or staged.

`Locals` holds the byte views of a rank's local shards (with contiguous temporaries for
parts whose last dim is strided). For a round, `directs` finds each message that is one
contiguous span of its tensor (`span`: a row-sharded region, a whole expert, adjacent
regions of one tensor): it goes straight from, or into, that tensor's storage (zero copy).
The other messages are staged: `pack` copies a round's staged sends into a send buffer,
`unpack` copies staged receives out of a receive buffer; copies that continue each other
both in storage and in the message are merged into contiguous runs, and a round's runs go
in one multi-tensor copy per direction (one launch for many on a GPU). `Staging` keeps the
buffers between runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from xfer.comm import Comm
from xfer.program import Copy, Message, Round, as_bytes
from xfer.segments import Local, Segments, copy_in, copy_out
from xfer.torch_private import copy_many

__all__ = [
    "Direct",
    "Locals",
    "Staging",
    "byte_viewable",
    "device_of",
    "directs",
    "pack",
    "recv_buffers",
    "span",
    "unpack",
]


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


class Locals:
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


def device_of(
    srcs: Sequence[Local | None], dsts: Sequence[Local | None], comm: Comm
) -> torch.device:
    for t in (*srcs, *dsts):
        if t is not None:
            return t.device
    dev = getattr(comm, "device", None)
    return dev if isinstance(dev, torch.device) else torch.device("cpu")


def span(local: Local | None, copies: tuple[Copy, ...], nbytes: int) -> torch.Tensor | None:
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
class Direct:
    """Per message of a round: its direct view (None: staged), and the staged bytes; per
    staged message, its copies with adjacent ones merged into runs (`pieces`)."""

    views: list[torch.Tensor | None]
    staged: int
    pieces: list[list[_Run | Copy]]

    @property
    def copies(self) -> int:
        """Copy launches to pack or unpack the round's staged messages."""
        return sum(len(p) for p in self.pieces)


def directs(
    msgs: tuple[Message, ...], side: list[Local | None], *, stage_all: bool = False
) -> Direct:
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
        v = span(local, m.copies, m.nbytes)
        views.append(v)
        pieces.append([] if v is not None else _runs(m, side))
        if v is None:
            staged += m.nbytes
    return Direct(views, staged, pieces)


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


def pack(
    rnd: Round,
    direct: Direct,
    buf: torch.Tensor,
    loc: Locals,
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


def recv_buffers(rnd: Round, direct: Direct, buf: torch.Tensor) -> list[torch.Tensor]:
    out, at = [], 0
    for m, v in zip(rnd.recvs, direct.views, strict=True):
        if v is not None:
            out.append(v)
        else:
            out.append(buf[at : at + m.nbytes])
            at += m.nbytes
    return out


def unpack(rnd: Round, direct: Direct, bufs: Sequence[torch.Tensor | None], loc: Locals) -> None:
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
