"""The `m2n` path: NVIDIA's native M2N reshard (`nccl.m2n.reshard`, package nccl-extensions).

Used only where it applies; `path="auto"` takes it per item when every rank agrees the item
fits, and replays the p2p plan for the rest. What fits (nccl-extensions 0.1.0):

* the comm is an `NcclComm` (`comm_reason`);
* each mesh has 1 or 2 axes over a contiguous, row-major rank interval, and the source and
  destination intervals do not overlap;
* each layout shards exactly one tensor dim on exactly one axis, evenly (one local shape per
  side), and the tensor has 1 to 3 dims;
* no destination shard is fed by more than `MAX_SOURCES` source shards and no source shard
  feeds more than `MAX_TARGETS` destination shards (the library's static arrays);
* the dtype is one the library knows (bool travels as uint8).

Those are metadata (`unsupported_reason`, the same on every rank). What only a rank can see is
checked by `rank_reason` (the module imports, and the NCCL library it loaded is at least
`MIN_NCCL`: torch's own wheel pins an older NCCL than nccl-extensions needs) and `local_reason`
(device, contiguity); `Resharder.run` agrees on those over the comm before any item takes m2n,
so a rank that cannot run it moves every rank to p2p for that item instead of hanging them.

Streams: the reshard is enqueued on `stream` (default: the current stream), which first waits
for the current stream (the sources are written, the destinations free); the current stream
then waits for it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.distributed.tensor import Shard

from xfer.comm import Comm
from xfer.layout import Layout
from xfer.plan import ReshardItem
from xfer.senders import template

__all__ = [
    "MAX_SOURCES",
    "MAX_TARGETS",
    "MIN_NCCL",
    "comm_reason",
    "local_reason",
    "rank_reason",
    "run_m2n",
    "unsupported_reason",
]

MIN_NCCL = (2, 30, 5)
MAX_SOURCES = 16  # source shards feeding one destination shard
MAX_TARGETS = 64  # destination shards fed by one source shard

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


def nccl_version() -> tuple[int, int, int] | None:
    """The version of the NCCL library nccl4py loaded, or None."""
    try:
        import nccl.core as nccl

        v = nccl.get_version()
    except Exception:
        return None
    if isinstance(v, int):  # NCCL_VERSION_CODE: major * 10000 + minor * 100 + patch
        return (v // 10000, v // 100 % 100, v % 100)
    parts = [int(x) for x in str(v).replace("-", ".").split(".")[:3] if x.isdigit()]
    return ([*parts, 0, 0, 0])[:3] if parts else None  # type: ignore[return-value]


@functools.cache
def rank_reason() -> str | None:
    """Why this process cannot run m2n at all; None if it can."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if _module() is None:
        return "nccl.m2n (nccl-extensions) is not importable"
    v = nccl_version()
    if v is None or v < MIN_NCCL:
        have = "unknown" if v is None else ".".join(map(str, v))
        return f"NCCL {have} is loaded; m2n needs {'.'.join(map(str, MIN_NCCL))} or newer"
    return None


def comm_reason(comm: Comm) -> str | None:
    if not hasattr(comm, "communicator"):
        return f"the comm is a {type(comm).__name__}, not an NcclComm"
    return None


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


def _fan(item: ReshardItem) -> str | None:
    t = template(item.src.key, item.dst.key)
    if len(t.cell) == 0:
        return None
    dst_cells = item.dst.geometry.cell_of[t.pos]
    pairs = np.unique(np.stack([t.cell, dst_cells]), axis=1)
    fan_in = np.bincount(pairs[1]).max()
    fan_out = np.bincount(pairs[0]).max()
    if fan_in > MAX_SOURCES:
        return f"a destination shard is fed by {fan_in} source shards (m2n: <= {MAX_SOURCES})"
    if fan_out > MAX_TARGETS:
        return f"a source shard feeds {fan_out} destination shards (m2n: <= {MAX_TARGETS})"
    return None


def unsupported_reason(item: ReshardItem, comm: Comm) -> str | None:
    """Why `item` cannot take the m2n path, from metadata alone (the same on every rank);
    None if it can."""
    why = comm_reason(comm)
    if why:
        return why
    if item.dtype not in _DTYPES:
        return f"dtype {item.dtype} is not supported by m2n"
    for lay, side in ((item.src, "source"), (item.dst, "destination")):
        reason = _layout_reason(lay, side)
        if reason:
            return reason
    s, d = item.src.mesh.flat, item.dst.mesh.flat
    if not (max(s) < min(d) or max(d) < min(s)):
        return "source and destination rank intervals overlap"
    return _fan(item)


def local_reason(t: object) -> str | None:
    """Why this rank's local tensor `t` cannot take m2n; None if it can (or there is none)."""
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
    current = torch.cuda.current_stream(comm.device)
    s = stream if stream is not None else current
    if s != current:
        s.wait_stream(current)
    with m2n.group():
        for it, src, dst in zip(items, srcs, dsts, strict=True):
            if it.dtype == torch.bool:
                src = None if src is None else src.view(torch.uint8)
                dst = None if dst is None else dst.view(torch.uint8)
            dtype = torch.uint8 if it.dtype == torch.bool else it.dtype
            kwargs: dict[str, Any] = {}
            for side, lay, t in (("src", it.src, src), ("dst", it.dst, dst)):
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
            m2n.reshard(src, dst, comm.communicator, s, **kwargs)
    if s != current:
        current.wait_stream(s)
