"""Position-weighted checksums of tensor regions, additive over disjoint regions.

``checksum(region) = sum over bytes b of b * (1 + (i mod 65521))``, where ``i`` is the byte's
row-major position in the whole tensor's byte view. Because it only depends on global
positions, the checksum of a receiver's box equals the sum of the checksums of the chunks its
senders sent, which lets a receiver verify a reshard with a few integers from each sender,
without ever assembling a full tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xfer.layout import Layout
from xfer.plan import Plan
from xfer.program import RankProgram, as_bytes, byte_shape
from xfer.segments import Local

__all__ = ["box_checksum", "region_checksum", "sent_checksums"]

MOD = 65521
_BLOCK = 1 << 22  # elements per step, to bound the index tensor


def region_checksum(region: torch.Tensor, start: Sequence[int], full: Sequence[int]) -> int:
    """Checksum of the uint8 n-d `region` placed at `start` in a byte view of shape `full`."""
    if region.numel() == 0:
        return 0
    strides = [1] * len(full)
    for d in range(len(full) - 2, -1, -1):
        strides[d] = strides[d + 1] * int(full[d + 1])
    total = 0
    rows = max(1, _BLOCK // max(1, region[0].numel() if region.dim() > 1 else 1))
    for r0 in range(0, region.shape[0], rows):
        part = region[r0 : r0 + rows]
        idx = torch.zeros(part.shape, dtype=torch.int64, device=part.device)
        for d, n in enumerate(part.shape):
            shape = [1] * part.dim()
            shape[d] = n
            lo = int(start[d]) + (r0 if d == 0 else 0)
            pos = torch.arange(lo, lo + n, dtype=torch.int64, device=part.device) * strides[d]
            idx += pos.view(shape)
        total += int((part.to(torch.int64) * (idx % MOD + 1)).sum())
    return total


def _origin(layout: Layout, rank: int, itemsize: int) -> list[int]:
    b = layout.bounds(rank)
    assert b is not None
    origin = [a for a, _ in b] or [0]
    if layout.shape:
        origin[-1] *= itemsize
    return origin


def _local_checksum(
    local: Local, index: tuple[slice, ...], start: list[int], full: Sequence[int]
) -> int:
    """Checksum of ``byte_view(local)[index]`` placed at `start` (segments piece by piece)."""
    if isinstance(local, torch.Tensor):
        return region_checksum(as_bytes(local.contiguous())[index], start, full)
    total = 0
    for off, rows in local.map(lambda p: as_bytes(p.contiguous())).pieces(index[0]):
        part_start = [start[0] + off, *start[1:]]
        total += region_checksum(rows[(slice(None), *index[1:])], part_start, full)
    return total


def box_checksum(local: Local | None, layout: Layout, rank: int) -> int:
    """Checksum of the box `rank` holds, in the whole tensor's byte view."""
    if local is None or not layout.holds(rank):
        return 0
    size = local.element_size()
    full = byte_shape(layout.shape, size)
    shape = byte_shape(tuple(local.shape), size)
    index = tuple(slice(0, n) for n in shape)
    return _local_checksum(local, index, _origin(layout, rank, size), full)


def sent_checksums(
    plan: Plan, program: RankProgram, srcs: Sequence[Local | None]
) -> dict[tuple[int, int], int]:
    """Per (item, receiving peer), the checksum of every byte this rank sends it."""
    out: dict[tuple[int, int], int] = {}
    for rnd in program.rounds:
        for m in rnd.sends:
            for c in m.copies:
                it = plan.items[c.item]
                local = srcs[c.item]
                assert local is not None
                origin = _origin(it.src, program.rank, it.itemsize)
                start = [o + s.start for o, s in zip(origin, c.index, strict=True)]
                full = byte_shape(it.src.shape, it.itemsize)
                key = (c.item, m.peer)
                out[key] = out.get(key, 0) + _local_checksum(local, c.index, start, full)
    return out
