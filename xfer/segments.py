"""`Segments`: a local shard made of views stacked along dim 0, never materialized.

Some trainers cannot show their shard of a global tensor as one strided view: Megatron keeps
q, k and v of each query group interleaved in one fused weight (a rank's q rows are one
stretch per group), and keeps each local expert in its own parameter (a rank's box of the
grouped ``[E, ...]`` tensor is one tensor per expert). `Segments(parts)` stands for the
concatenation of `parts` along dim 0 without copying; the executors read and write it
piecewise (`copy_out`, `copy_in`). All parts share trailing shape, dtype and device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Union

import torch

from xfer.errors import XferError

__all__ = ["Local", "Segments", "copy_in", "copy_out"]


class Segments:
    def __init__(self, parts: Sequence[torch.Tensor]) -> None:
        parts = list(parts)
        if not parts:
            raise XferError("Segments needs at least one part")
        first = parts[0]
        bad = [
            i
            for i, p in enumerate(parts)
            if p.dim() != first.dim()
            or p.dim() == 0
            or tuple(p.shape[1:]) != tuple(first.shape[1:])
            or p.dtype != first.dtype
            or p.device != first.device
        ]
        if bad:
            raise XferError(
                f"Segments parts must share their trailing shape {list(first.shape[1:])}, dtype "
                f"{first.dtype} and device {first.device}; parts {bad} do not"
            )
        self.parts = parts
        starts = [0]
        for p in parts:
            starts.append(starts[-1] + int(p.shape[0]))
        self.starts = starts
        self.shape = torch.Size((starts[-1], *first.shape[1:]))
        self.dtype = first.dtype
        self.device = first.device

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.parts[0].element_size()

    def pieces(self, rows: slice) -> Iterator[tuple[int, torch.Tensor]]:
        """(row offset within `rows`, the part's rows) covering ``rows`` in order."""
        a, b = rows.start or 0, self.shape[0] if rows.stop is None else rows.stop
        for p, lo in zip(self.parts, self.starts, strict=False):
            hi = lo + int(p.shape[0])
            s, e = max(a, lo), min(b, hi)
            if s < e:
                yield s - a, p[s - lo : e - lo]

    def map(self, fn: object) -> Segments:
        return Segments([fn(p) for p in self.parts])  # type: ignore[operator]

    def contiguous(self) -> torch.Tensor:
        return torch.cat([p.reshape(p.shape) for p in self.parts])

    def __repr__(self) -> str:
        return f"Segments({len(self.parts)} parts, shape {list(self.shape)}, {self.dtype})"


Local = Union[torch.Tensor, Segments]  # noqa: UP007 - used at runtime in isinstance checks


def copy_out(src: Local, index: tuple[slice, ...], out: torch.Tensor) -> None:
    """``out.copy_(src[index])``; `out` has the region's shape."""
    if isinstance(src, torch.Tensor):
        out.copy_(src[index])
        return
    for off, rows in src.pieces(index[0]):
        out[off : off + rows.shape[0]].copy_(rows[(slice(None), *index[1:])])


def copy_in(dst: Local, index: tuple[slice, ...], src: torch.Tensor) -> None:
    """``dst[index].copy_(src)``; `src` has the region's shape."""
    if isinstance(dst, torch.Tensor):
        dst[index].copy_(src)
        return
    for off, rows in dst.pieces(index[0]):
        rows[(slice(None), *index[1:])].copy_(src[off : off + rows.shape[0]])
