"""The broadcast reference (`run_golden`): the slow, obviously correct oracle of a reshard.

For each item, each non-empty source cell is broadcast from its first holder (in mesh order)
to the whole group, through one scratch buffer sized for the largest cell (kept between
runs); every rank whose destination box meets the cell copies the overlap. Every rank
receives every byte, which is why it is slow, and it shares nothing with the plan, which is
why it is the reference the p2p path is checked against. It takes the same per-item local
tensors as `run_p2p` and only talks through a `Comm`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from xfer.comm import Comm
from xfer.execute import XferStats
from xfer.plan import ReshardItem
from xfer.segments import Local, copy_in, copy_out
from xfer.staging import Locals, Staging, device_of

__all__ = ["run_golden"]


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
    loc = Locals(srcs, dsts)
    device = device_of(srcs, dsts, comm)
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
