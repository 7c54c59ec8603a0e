"""The `m2n` path: NVIDIA's native M2N reshard (`nccl.m2n.reshard`, package nccl-extensions).

Used only where it applies; `path="auto"` takes it per item when every rank agrees the item
fits, and replays the p2p plan for the rest. What fits (nccl-extensions 0.1.0):

* the comm is an `NcclComm` and the tensors are contiguous CUDA tensors;
* each mesh has 1 or 2 axes over a contiguous, row-major rank interval, and the source and
  destination intervals do not overlap;
* each layout shards exactly one tensor dim on exactly one axis, evenly (one local shape per
  side), and the tensor has 1 to 3 dims;
* the dtype is one the library knows (bool travels as uint8).

`unsupported_reason` answers from metadata (the same on every rank); `local_reason` adds what
only this rank can see (device, contiguity) and is agreed over the comm before use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.tensor import Shard

from xfer.comm import Comm
from xfer.layout import Layout
from xfer.plan import ReshardItem

__all__ = ["available", "local_reason", "run_m2n", "unsupported_reason"]

_DTYPES = {
    torch.int8,
    torch.uint8,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.float32,
    torch.int64,
    torch.float64,
    torch.bool,
}


def _module() -> Any:
    try:
        import nccl.m2n as m2n
    except Exception:  # ImportError, or a CUDA/NCCL library that fails to load
        return None
    return m2n


def available() -> bool:
    return torch.cuda.is_available() and _module() is not None


def _layout_reason(lay: Layout, side: str) -> str | None:
    if not 1 <= lay.mesh.ndim <= 2:
        return f"{side} mesh has {lay.mesh.ndim} axes (m2n takes 1 or 2)"
    if not lay.mesh.is_interval():
        return f"{side} mesh ranks are not a contiguous interval"
    if not 1 <= lay.ndim <= 3:
        return f"{side} tensor has {lay.ndim} dims (m2n takes 1 to 3)"
    shards = [p for p in lay.placements if isinstance(p, Shard)]
    if len(shards) != 1:
        return f"{side} layout shards {len(shards)} axes (m2n takes exactly one)"
    g = lay.geometry
    sizes = g.stops - g.starts
    if not (sizes == sizes[0]).all():
        return f"{side} layout has uneven shards"
    return None


def unsupported_reason(item: ReshardItem, comm: Comm) -> str | None:
    """Why `item` cannot take the m2n path, from metadata alone; None if it can."""
    if _module() is None:
        return "nccl.m2n is not importable"
    if not hasattr(comm, "communicator"):
        return "the comm is not an NcclComm"
    if item.dtype not in _DTYPES:
        return f"dtype {item.dtype} is not supported by m2n"
    for lay, side in ((item.src, "source"), (item.dst, "destination")):
        reason = _layout_reason(lay, side)
        if reason:
            return reason
    s, d = item.src.mesh.flat, item.dst.mesh.flat
    if not (max(s) < min(d) or max(d) < min(s)):
        return "source and destination rank intervals overlap"
    return None


def local_reason(t: object) -> str | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        return f"local shard is a {type(t).__name__}, not one tensor"
    if t.device.type != "cuda":
        return f"local tensor is on {t.device}"
    if not t.is_contiguous():
        return "local tensor is not contiguous"
    return None


def run_m2n(
    items: Sequence[ReshardItem],
    srcs: Sequence[torch.Tensor | None],
    dsts: Sequence[torch.Tensor | None],
    comm: Any,
    *,
    stream: Any = None,
) -> None:
    """Reshard every item with one batched m2n group (all ranks call with the same items)."""
    m2n = _module()
    assert m2n is not None
    if stream is None:
        stream = torch.cuda.current_stream()
    with m2n.group():
        for it, s, d in zip(items, srcs, dsts, strict=True):
            if it.dtype == torch.bool:
                s = None if s is None else s.view(torch.uint8)
                d = None if d is None else d.view(torch.uint8)
            dtype = torch.uint8 if it.dtype == torch.bool else it.dtype
            kwargs: dict[str, Any] = {}
            for side, lay, t in (("src", it.src, s), ("dst", it.dst, d)):
                kwargs[f"{side}_mesh"] = m2n.Mesh(list(lay.mesh.shape), start_rank=lay.mesh.flat[0])
                kwargs[f"{side}_placements"] = [
                    m2n.Shard(p.dim) if isinstance(p, Shard) else m2n.Replicate()
                    for p in lay.placements
                ]
                if t is None:
                    kwargs[f"{side}_local_shape"] = list(
                        lay.geometry.stops[0] - lay.geometry.starts[0]
                    )
                    kwargs[f"{side}_dtype"] = dtype
            m2n.reshard(s, d, comm.communicator, stream, **kwargs)
