"""The p2p executor: replay a plan (`run_p2p`); the broadcast reference is `xfer.golden`.

`run_p2p` takes, per item, this rank's local source tensor and local destination tensor
(None where the rank holds no such box) and only talks through a `Comm`. Validation happens
before it (`xfer.validate`); it assumes its inputs are right.

p2p
    Local copies first (no staging). Then the rank's rounds, double-buffered: while round
    ``i`` is on the wire, round ``i + 1`` is packed into the other pair of staging buffers;
    round ``i`` is then unpacked. **Zero copy** (`xfer.staging`): a message whose bytes are
    one contiguous span of the local tensor (a row-sharded region, a whole expert, adjacent
    regions of one tensor) is sent straight from, or received straight into, that tensor's
    storage; only messages that are strided on a side are staged, and only on that side. A
    message spanning several tensors is staged on both sides, so the plan sends a large
    chunk as a message of its own (`Plan.part_cuts`): it goes straight wherever its region
    is contiguous. Staging is uint8: for each direction, two buffers of the largest round's
    staged bytes. `XferStats` counts the bytes packed and unpacked (zero when every region is
    contiguous).

    Relay (`Message.forward`): a rank that forwards to another replica receives the rounds it
    forwards wholly staged (back to back, as the plan lays them out) and, in the next round,
    sends that receive buffer on as it lies, without packing, while it unpacks it. Its rounds
    go on the wire one after another, not two at a time: a forwarding round needs what the
    round before received, and the round after a forwarding one receives into the buffer it
    sends from (on NCCL the wait orders the streams; with an ``interrupt``, as the runtime
    runs, the host also polls for the round's end before posting the next). Its unpack
    still overlaps the next round, and two receive buffers do.

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
from xfer.program import RankProgram
from xfer.segments import Local, copy_in, copy_out
from xfer.staging import Direct, Locals, Staging, device_of, directs, pack, recv_buffers, unpack

__all__ = [
    "Prepared",
    "XferStats",
    "pipeline",
    "prepare",
    "round_directs",
    "run_p2p",
    "staging_need",
]


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


@dataclass
class Prepared:
    """What a p2p run sets up before its first round: byte views of the local tensors,
    per round which messages go straight from or into storage, and the staging buffers."""

    loc: Locals
    device: torch.device
    sends: list[Direct]
    recvs: list[Direct]
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


def round_directs(
    program: RankProgram, src: list[Local | None], dst: list[Local | None]
) -> tuple[list[Direct], list[Direct]]:
    """Per round, what its sends and its receives stage (`src`, `dst`: byte views)."""
    fed = _fed_rounds(program)
    sends = [directs(r.sends, src) for r in program.rounds]
    recvs = [directs(r.recvs, dst, stage_all=i in fed) for i, r in enumerate(program.rounds)]
    return sends, recvs


def staging_need(program: RankProgram, src: list[Local | None], dst: list[Local | None]) -> int:
    """The staging bytes a p2p run of `program` allocates over these byte views of the local
    tensors (`meta` tensors will do): two buffers of the largest round's staged sends and two
    of its staged receives."""
    sends, recvs = round_directs(program, src, dst)
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
    """Set up a p2p run of `program` (`keep`: see `Locals`)."""
    loc = Locals(srcs, dsts, keep=keep)
    device = device_of(srcs, dsts, comm)
    sends, recvs = round_directs(program, loc.src_bytes, loc.dst_bytes)
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
        out = pack(rnd, run.sends[i], run.sbufs[i % 2], run.loc, forwarded=forwarded)
        into = recv_buffers(rnd, run.recvs[i], run.rbufs[i % 2])
        work = comm.send_recv(
            [Transfer(m.peer, b) for m, b in zip(rnd.sends, out, strict=True)],
            [Transfer(m.peer, b) for m, b in zip(rnd.recvs, into, strict=True)],
            stream=stream,
        )
        return into, work

    def land(i: int, into: list[torch.Tensor]) -> None:
        unpack(rounds[i], run.recvs[i], into, run.loc)

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
    loc: Locals,
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


def _local_copies(program: RankProgram, loc: Locals) -> int:
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
