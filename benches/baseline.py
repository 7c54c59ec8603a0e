"""The gather + broadcast baseline's gather, shared by the refit benchmark and the kernel's.

The baseline moves a tensor in two steps: a root rank gathers the whole tensor (the cells it
lacks come from their first holders, in one group of messages), then broadcasts it to the
ranks that need parts of it. `gather` is the first step; what is broadcast, and what each
receiver keeps, differ between the two benchmarks and stay with them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from benches.simulate import remote_cells
from xfer import ReshardItem, Transfer
from xfer.comm import Comm
from xfer.program import as_bytes

__all__ = ["gather"]


def gather(
    it: ReshardItem,
    root: int,
    rank: int,
    comm: Comm,
    full: torch.Tensor | None,
    shard: torch.Tensor | None,
    scratch: Callable[[int], torch.Tensor],
) -> None:
    """`root` assembles the whole of `it` in `full` (its own cell copied, every other
    non-empty cell received as bytes from its owner into ``scratch(total bytes)`` and copied
    into place); each owner of a cell `root` lacks sends its `shard`. Other ranks: nothing."""
    geo = it.src.geometry
    remote, owners = remote_cells(it, root)
    remote &= geo.cell_numel() > 0
    if rank == root:
        assert full is not None
        if it.src.holds(root) and shard is not None:
            full[it.src.box(root)].copy_(shard)
        want = np.flatnonzero(remote)
        sizes = [int(geo.cell_numel()[u]) * it.itemsize for u in want]
        cells = scratch(sum(sizes))
        parts, offset = [], 0
        for u, n in zip(want, sizes, strict=True):
            box = tuple(
                slice(int(a), int(b))
                for a, b in zip(geo.cell_starts[u], geo.cell_stops[u], strict=True)
            )
            parts.append((int(owners[u]), box, cells[offset : offset + n]))
            offset += n
        comm.send_recv([], [Transfer(o, v) for o, _, v in parts]).wait()
        for _, box, part in parts:
            full[box].copy_(part.view(it.dtype).view(full[box].shape))
    elif shard is not None and (owners[remote] == rank).any():
        comm.send_recv([Transfer(root, as_bytes(shard.contiguous()))], []).wait()
