"""Sparse-delta p2p: each message carries only what changed since the last run, exactly.

Between two RL steps most BF16 weights keep every bit (an update below half an ulp is
rounded away when the master weights are cast). `run_p2p_delta` replays the same plan as
`xfer.execute.run_p2p`, message for message, but every rank keeps *baselines* (`Baselines`):
a copy of each source shard it last sent from (one copy however many receivers the shard
goes to, e.g. every engine replica) and the bytes of each message it last received.

Encoding, per message, in words of the message's item size (``w`` bytes): compare the
message's current bytes with the sender's baseline and send the cheapest exact form:

=========  ======================================  =====================
kind       payload                                 bytes
=========  ======================================  =====================
same       nothing (no message at all)             0
positions  int32 word offsets, then the new words  ``k * (4 + w)``
bitmap     one bit per word, then the new words    ``ceil(n / 8) + k * w``
dense      the message's bytes, as `run_p2p`       ``n * w``
=========  ======================================  =====================

(``n`` words, ``k`` changed). Sizes are data-dependent while a point-to-point receive must
know its size, so a delta run first encodes every message, then exchanges one small header
per peer pair (an int64 per message: ``kind | size << 2``) in one batch, then runs the
rounds with exact sizes. The receiver applies the payload to its baseline and writes the
whole message into its destination (so a destination that is a fresh buffer each run, such
as an engine's checkpoint-format copy, ends up whole): the result is bit-identical to a
dense run. Local copies run dense.

Dense runs (``against=None``) move bytes exactly as `run_p2p` and record the baselines.
Baselines are only true if every rank completed the run they come from: a run that raises
drops this rank's baselines (`Baselines.reset`), and callers run dense whenever any rank may
have lost them (the refit runtime starts every communicator generation dense). The version
check lives with the caller (`xfer.api.Resharder.run` agrees on ``against`` before any
data moves, and refuses a rank whose baselines hold another version).

In-place destinations: where a destination keeps the previous run's bytes (an engine's live
weights), the receiver patches it directly and keeps no baseline for those messages.

Receive-only runs: receivers bring their baselines up to date and leave their destinations
alone; `apply_received` writes them later. An engine keeps serving while the bytes arrive
and pauses only for that write.

Memory (stated by `Baselines.nbytes`): a copy of the source shards a rank sends from and of
every byte it receives, on `Baselines.device` (host memory by default, pinned when the
transfer runs on a GPU); a sender holds the encoded payloads of one run (never more than the
dense bytes, only messages that encode smaller than dense); a receiver stages encoded
payloads in two buffers of at most one round each.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from xfer.comm import Comm, Transfer, Work
from xfer.execute import XferStats, pipeline, prepare
from xfer.program import Message, RankProgram
from xfer.segments import Local, Segments, copy_in, copy_out
from xfer.staging import Locals, Staging, directs, pack, recv_buffers, span, unpack

__all__ = ["KINDS", "Baselines", "apply_received", "decode", "encode", "run_p2p_delta"]

SAME, POSITIONS, BITMAP, DENSE = 0, 1, 2, 3
KINDS = ("same", "positions", "bitmap", "dense")
_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_SAMPLE_STRIDE = 61  # a word in this many is compared before the whole message
_DENSE_ABOVE = 0.97  # sampled fraction changed above which dense is taken at once


class Baselines:
    """One rank's baselines for delta runs: the byte views of the source shards it last
    sent from (by item), the bytes of every message it last received (by round and index),
    and the `version` they hold (None: none yet, the next run must be dense)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.version: int | None = None
        self.sources: dict[int, Local] = {}
        self.received: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        src = sum(
            sum(p.numel() for p in s.parts) if isinstance(s, Segments) else s.numel()
            for s in self.sources.values()
        )
        return src + sum(t.numel() for t in self.received.values())

    def reset(self) -> None:
        self.version = None
        self.sources.clear()
        self.received.clear()

    def _keep_source(self, item: int, src: Local) -> None:
        """Record this rank's source shard of `item` (a byte view) as its baseline."""
        old = self.sources.get(item)
        if isinstance(src, Segments):
            olds = old.parts if isinstance(old, Segments) else [None] * len(src.parts)
            self.sources[item] = Segments(
                [self._copy(o, p) for o, p in zip(olds, src.parts, strict=True)]
            )
        else:
            self.sources[item] = self._copy(old if isinstance(old, torch.Tensor) else None, src)

    def _copy(self, old: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
        if old is None or old.shape != t.shape:
            pin = self.device.type == "cpu" and t.device.type == "cuda"
            old = torch.empty(t.shape, dtype=t.dtype, device=self.device, pin_memory=pin)
        old.copy_(t)
        return old

    def _message(self, m: Message) -> torch.Tensor:
        """A sent message's baseline bytes: a view of the source baselines where they are
        one span of them, else gathered."""
        items = {c.item for c in m.copies}
        if len(items) == 1:
            v = span(self.sources[next(iter(items))], m.copies, m.nbytes)
            if v is not None:
                return v
        out = torch.empty(m.nbytes, dtype=torch.uint8, device=self.device)
        for c in m.copies:
            src = self.sources[c.item]
            copy_out(src, c.index, out[c.offset : c.offset + c.nbytes].view(c.shape))
        return out

    def _keep_received(
        self, store: dict[tuple[int, int], torch.Tensor], key: Any, b: torch.Tensor
    ) -> None:
        """Record `b` (a message's bytes) as the baseline of `key`."""
        base = store.get(key)
        if base is None or base.numel() != b.numel():
            pin = self.device.type == "cpu" and b.device.type == "cuda"
            base = torch.empty(b.numel(), dtype=torch.uint8, device=self.device, pin_memory=pin)
            store[key] = base
        base.copy_(b)


def word_size(itemsizes: Sequence[int], msg: Message) -> int:
    """The word the message is compared in: the gcd of its items' sizes (1, 2, 4 or 8)."""
    w = 0
    for c in msg.copies:
        w = math.gcd(w, itemsizes[c.item])
    w = w or 1
    while w > 1 and msg.nbytes % w:
        w //= 2
    return w if w in _WORD else 1


def _words(b: torch.Tensor, w: int) -> torch.Tensor:
    return _view(b, _WORD[w])


def encode(cur: torch.Tensor, base: torch.Tensor, w: int) -> tuple[int, torch.Tensor | None]:
    """The cheapest exact encoding of `cur` (a message's bytes) against `base` (the same
    message's baseline bytes): ``(kind, payload)``; payload None for ``same`` and ``dense``.

    A sample of the words is compared first: when nearly all of them changed, dense is the
    cheapest form and the full comparison is skipped (dense is exact whatever changed)."""
    cw = _words(cur, w)
    bw = _view(base.to(cur.device), _WORD[w])  # a span of the source baselines may be odd
    n = int(cw.numel())
    if n >= 64 * _SAMPLE_STRIDE:
        sample = (cw[::_SAMPLE_STRIDE] != bw[::_SAMPLE_STRIDE]).float().mean()
        if float(sample) > _DENSE_ABOVE:
            return DENSE, None
    changed = cw != bw
    idx = changed.nonzero().flatten()  # faster than counting a bool tensor on CPU
    k = int(idx.numel())
    if k == 0:
        return SAME, None
    sizes = {DENSE: n * w, BITMAP: (n + 7) // 8 + k * w}
    if n < 2**31:
        sizes[POSITIONS] = k * (4 + w)
    kind = min(sizes, key=lambda x: (sizes[x], -x))  # dense wins ties
    if kind == DENSE:
        return DENSE, None
    values = cw[idx].view(torch.uint8)
    if kind == POSITIONS:
        head = idx.to(torch.int32).view(torch.uint8)
    else:
        pad = torch.zeros(-n % 8, dtype=torch.bool, device=changed.device)
        bits = torch.cat([changed, pad]).view(-1, 8).to(torch.uint8)
        head = (bits * _BITS.to(bits.device)).sum(dim=1, dtype=torch.uint8)
    return kind, torch.cat([head, values])


def decode(kind: int, payload: torch.Tensor, base: torch.Tensor, w: int) -> None:
    """Apply an encoded payload to `base` (the receiver's baseline bytes), in place."""
    bw = base.view(_WORD[w])
    n = bw.numel()
    payload = payload.to(base.device)
    if kind == POSITIONS:
        k = payload.numel() // (4 + w)
        idx = _view(payload[: 4 * k], torch.int32).long()
        vals = payload[4 * k :]
    else:
        nb = (n + 7) // 8
        bits = (payload[:nb, None] & _BITS.to(payload.device)) != 0
        idx = bits.flatten()[:n].nonzero().flatten()
        vals = payload[nb:]
    bw[idx] = _view(vals, _WORD[w])


def _align(n: int) -> int:
    return (n + 7) // 8 * 8


def _view(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` (uint8, 1-d) viewed as `dtype`, through an aligned copy where its offset is not."""
    size = torch.empty((), dtype=dtype).element_size()
    if size > 1 and t.storage_offset() % size:
        t = t.clone()
    return t.view(dtype)


def _header(kind: int, size: int) -> int:
    return kind | size << 2


def run_p2p_delta(
    program: RankProgram,
    itemsizes: Sequence[int],
    srcs: Sequence[Local | None],
    dsts: Sequence[Local | None],
    comm: Comm,
    baselines: Baselines,
    *,
    version: int,
    against: int | None,
    receive_only: bool = False,
    in_place: frozenset[int] = frozenset(),
    stream: Any = None,
    staging: Staging | None = None,
) -> XferStats:
    """Run `program` as a delta against `baselines` (``against``: the version they must
    hold) or, with ``against=None``, dense while recording them. On success the baselines
    hold `version`; on any error they are dropped.

    ``receive_only``: receivers leave their destinations alone (pass None for them) and only
    bring their baselines to `version`; `apply_received` writes them later (an engine keeps
    serving while the bytes arrive and pauses only for that write).

    `in_place`: items whose destinations persist between runs and hold exactly what the
    last run wrote (an engine's live weights): a message landing only in those is patched
    there and keeps no received baseline (no memory, no write-back)."""
    try:
        stats = _run(
            program,
            itemsizes,
            srcs,
            dsts,
            comm,
            baselines,
            against,
            receive_only,
            in_place,
            stream,
            staging,
        )
    except BaseException:
        baselines.reset()
        raise
    baselines.version = version
    return stats


def _run(
    program: RankProgram,
    itemsizes: Sequence[int],
    srcs: Sequence[Local | None],
    dsts: Sequence[Local | None],
    comm: Comm,
    base: Baselines,
    against: int | None,
    receive_only: bool,
    in_place: frozenset[int],
    stream: Any,
    staging: Staging | None,
) -> XferStats:
    t0 = time.perf_counter()
    if against is not None and base.version != against:
        raise ValueError(f"baselines hold version {base.version}, not {against}")
    if receive_only and any(dsts[lc.item] is not None for lc in program.local):
        raise ValueError("a receive-only run cannot make local copies into destinations")
    staging = staging or Staging()
    run = prepare(program, srcs, dsts, comm, staging, keep=bool(in_place) and against is not None)
    loc, device, sends, recvs = run.loc, run.device, run.sends, run.recvs
    sbufs, rbufs = run.sbufs, run.rbufs
    send_staging, recv_staging = run.send_staging, run.recv_staging
    rounds = program.rounds

    # kinds and payloads of every send (dense: as run_p2p)
    skind: dict[tuple[int, int], int] = {}
    spay: dict[tuple[int, int], torch.Tensor] = {}
    if against is not None:
        for i, rnd in enumerate(rounds):
            cur = pack(rnd, sends[i], sbufs[0], loc)
            for j, (m, b) in enumerate(zip(rnd.sends, cur, strict=True)):
                kind, payload = encode(b, base._message(m), word_size(itemsizes, m))
                skind[(i, j)] = kind
                if payload is not None:
                    spay[(i, j)] = payload
    sent_items = sorted({c.item for r in rounds for m in r.sends for c in m.copies})
    for item in sent_items:  # the sources do not change during the run
        src = loc.src_bytes[item]
        assert src is not None
        base._keep_source(item, src)
    rkind = _exchange_headers(program, comm, skind, spay, stream) if against is not None else {}

    # messages whose every byte lands in destinations that keep the previous run's bytes
    # (`in_place`): received and patched there, no baseline kept
    inplace = [
        [
            not receive_only
            and bool(m.copies)
            and all(c.item in in_place for c in m.copies)
            and (against is None or (i, j) not in base.received)
            for j, m in enumerate(r.recvs)
        ]
        for i, r in enumerate(rounds)
    ]
    if against is None:  # a dense run: in-place messages keep no received baseline
        for i, r in enumerate(rounds):
            for j in range(len(r.recvs)):
                if inplace[i][j]:
                    base.received.pop((i, j), None)

    def send_list(i: int) -> list[Transfer]:
        rnd = rounds[i]
        wanted = [skind.get((i, j), DENSE) == DENSE for j in range(len(rnd.sends))]
        dense = pack(rnd, sends[i], sbufs[i % 2], loc, wanted)
        out = []
        for j, (m, b) in enumerate(zip(rnd.sends, dense, strict=True)):
            kind = skind.get((i, j), DENSE)
            if kind == DENSE:
                out.append(Transfer(m.peer, b))
            elif kind != SAME:
                out.append(Transfer(m.peer, spay[(i, j)]))
        return out

    rsize = [
        sum(
            _align(rkind[(i, j)][1])
            for j in range(len(r.recvs))
            if rkind.get((i, j), (DENSE, 0))[0] in (POSITIONS, BITMAP)
        )
        for i, r in enumerate(rounds)
    ]
    dbufs = [staging.get("delta", i, max(rsize, default=0), device) for i in (0, 1)]

    def recv_list(i: int) -> tuple[list[Transfer], list[torch.Tensor | None]]:
        rnd = rounds[i]
        dense = recv_buffers(rnd, recvs[i], rbufs[i % 2])
        out: list[Transfer] = []
        into: list[torch.Tensor | None] = []
        at = 0
        for j, (m, b) in enumerate(zip(rnd.recvs, dense, strict=True)):
            kind, size = rkind.get((i, j), (DENSE, m.nbytes))
            if kind == DENSE:
                buf: torch.Tensor | None = b
            elif kind == SAME:
                buf = None
            else:
                buf = dbufs[i % 2][at : at + size]
                at += _align(size)  # payloads start 8-byte aligned (their words are viewed)
            if buf is not None:
                out.append(Transfer(m.peer, buf))
            into.append(buf)
        return out, into

    def apply(i: int, into: list[torch.Tensor | None]) -> None:
        rnd = rounds[i]
        dense = [
            b if rkind.get((i, j), (DENSE, 0))[0] == DENSE else None for j, b in enumerate(into)
        ]
        if not receive_only:
            unpack(rnd, recvs[i], dense, loc)
        for j, (m, b) in enumerate(zip(rnd.recvs, into, strict=True)):
            kind = rkind.get((i, j), (DENSE, 0))[0]
            if inplace[i][j]:  # the destination holds the baseline itself
                if kind in (POSITIONS, BITMAP):
                    assert b is not None
                    _decode_into(m, recvs[i].views[j], kind, b, word_size(itemsizes, m), loc)
                continue
            if kind == DENSE:
                assert b is not None
                base._keep_received(base.received, (i, j), b)
                continue
            bb = base.received.get((i, j))
            if bb is None:
                raise ValueError(
                    f"rank {comm.rank}: no baseline for message {j} of round {i} (its "
                    "destination was patched in place before): run dense"
                )
            if kind != SAME:
                assert b is not None
                decode(kind, b, bb, word_size(itemsizes, m))
            if not receive_only:
                _write(m, recvs[i].views[j], bb, loc)

    wire = [0, 0]  # bytes sent, received

    def post(i: int) -> tuple[list[torch.Tensor | None], Work]:
        out = send_list(i)
        incoming, into = recv_list(i)
        wire[0] += sum(t.buffer.numel() for t in out)
        wire[1] += sum(t.buffer.numel() for t in incoming)
        return into, comm.send_recv(out, incoming, stream=stream)

    local_bytes = pipeline(program, loc, post, apply)
    return run.stats(
        "p2p-delta" if against is not None else "p2p",
        t0,
        program,
        local_bytes,
        staging_bytes=2 * (send_staging + recv_staging + max(rsize, default=0)),
        wire_bytes_sent=wire[0],
        wire_bytes_received=wire[1],
        kinds_sent=tuple(sum(1 for k in skind.values() if k == x) for x in range(4))
        if against is not None
        else (0, 0, 0, sum(len(r.sends) for r in rounds)),
    )


def apply_received(program: RankProgram, dsts: Sequence[Local | None], base: Baselines) -> int:
    """Write what a receive-only run brought into `base` into this rank's destinations
    (every byte of every message it receives); the bytes written."""
    loc = Locals([None] * len(dsts), dsts)
    n = 0
    for i, rnd in enumerate(program.rounds):
        views = directs(rnd.recvs, loc.dst_bytes).views
        for j, m in enumerate(rnd.recvs):
            _write(m, views[j], base.received[(i, j)], loc)
            n += m.nbytes
    loc.finish()
    return n


def _decode_into(
    m: Message, view: torch.Tensor | None, kind: int, payload: torch.Tensor, w: int, loc: Locals
) -> None:
    """Apply an encoded payload to a message's bytes where they live: the destination."""
    if view is not None and view.storage_offset() % w == 0:
        decode(kind, payload, view, w)
        return
    here = torch.empty(m.nbytes, dtype=torch.uint8, device=payload.device)
    for c in m.copies:
        dst = loc.dst_bytes[c.item]
        assert dst is not None
        copy_out(dst, c.index, here[c.offset : c.offset + c.nbytes].view(c.shape))
    decode(kind, payload, here, w)
    _write(m, view, here, loc)


def _write(m: Message, view: torch.Tensor | None, b: torch.Tensor, loc: Locals) -> None:
    """Write a whole message's bytes `b` into this rank's destinations."""
    if view is not None:
        view.copy_(b)
        return
    for c in m.copies:
        dst = loc.dst_bytes[c.item]
        assert dst is not None
        copy_in(dst, c.index, b[c.offset : c.offset + c.nbytes].to(dst.device).view(c.shape))


def _exchange_headers(
    program: RankProgram,
    comm: Comm,
    skind: dict[tuple[int, int], int],
    spay: dict[tuple[int, int], torch.Tensor],
    stream: Any,
) -> dict[tuple[int, int], tuple[int, int]]:
    """Send every peer the kind and size of each message to it, in plan order; return the
    kind and size of every message this rank receives."""
    out: dict[int, list[int]] = {}
    expect: dict[int, list[tuple[int, int]]] = {}
    for i, rnd in enumerate(program.rounds):
        for j, m in enumerate(rnd.sends):
            kind = skind[(i, j)]
            size = {SAME: 0, DENSE: m.nbytes}.get(kind, 0)
            if kind in (POSITIONS, BITMAP):
                size = spay[(i, j)].numel()
            out.setdefault(m.peer, []).append(_header(kind, size))
        for j, m in enumerate(rnd.recvs):
            expect.setdefault(m.peer, []).append((i, j))
    device = getattr(comm, "device", None)
    device = device if isinstance(device, torch.device) else torch.device("cpu")
    sends = [
        Transfer(p, torch.tensor(v, dtype=torch.int64, device=device))
        for p, v in sorted(out.items())
    ]
    recvs = [
        Transfer(p, torch.empty(len(keys), dtype=torch.int64, device=device))
        for p, keys in sorted(expect.items())
    ]
    comm.send_recv(sends, recvs, stream=stream).wait()
    kinds: dict[tuple[int, int], tuple[int, int]] = {}
    for t in recvs:
        for key, h in zip(expect[t.peer], t.buffer.cpu().tolist(), strict=True):
            kind, size = h & 3, h >> 2
            i, j = key
            m = program.rounds[i].recvs[j]
            ok = (
                (kind == SAME and size == 0)
                or (kind == DENSE and size == m.nbytes)
                or (kind in (POSITIONS, BITMAP) and 0 < size <= m.nbytes)
            )
            if not ok:
                raise ValueError(
                    f"rank {comm.rank}: peer {t.peer} announced a {KINDS[kind]} message of {size} B "
                    f"for a {m.nbytes} B region (round {i})"
                )
            kinds[key] = (kind, size)
    return kinds
