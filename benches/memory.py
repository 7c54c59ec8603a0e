"""The memory a refit adds on each rank, beyond the weights, from the plan alone.

Per refit rank and path, the bytes the runtime (or the benchmark's baseline) allocates for one
refit, as `benches.localrun` allocates them (its measurements are compared with these):

* p2p: send staging is double-buffered, and so is receive staging: at most 2 x the rank's
  largest send round + 2 x its largest receive round (`PlanStats.peak_send_round`,
  `peak_recv_round`; a trainer rank only sends, an engine rank receives). An engine rank that
  forwards to another replica (relay, `xfer.plan`) sends its receive staging on as it lies:
  it stages no send. An engine rank
  also holds every misc tensor whole while the engine loads them. That is the bound
  (`extra_memory`). The runtime stages less: a message whose bytes are one contiguous span of
  the local tensor goes straight from (or into) its storage, and only the other messages are
  staged (`xfer.staging`, zero copy). `zero_copy_extra` computes that exactly for given ranks
  from their programs, assuming every local tensor is stored contiguously (true of the local
  run's shards and buffers; a trainer whose HF-named tensors are strided views of fused
  parameters stages more, up to the bound). It builds each rank's program: about a second per
  rank at DeepSeek-V3 scale, so full-scale figures sample ranks.
* golden: one scratch buffer of the largest source cell of any tensor, on every rank; misc
  tensors whole on engine ranks.
* baseline (gather + broadcast): a stage's root holds its largest tensor whole and a buffer
  for the largest part of a tensor it gathers; every engine rank holds the largest tensor
  whole (the broadcast's buffer) and every misc tensor whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from benches.simulate import remote_cells
from refit.planner import RefitPlan
from xfer import Plan, ReshardItem, build_program
from xfer.execute import staging_need
from xfer.program import as_bytes
from xfer.segments import Local

__all__ = ["ExtraMemory", "extra_memory", "misc_bytes", "zero_copy_extra"]

PATHS = ("p2p", "golden", "baseline")


@dataclass(frozen=True)
class ExtraMemory:
    """Bytes per refit rank (arrays over ranks ``0..world-1``) for each path in `PATHS`."""

    trainer_world: int
    by_path: dict[str, np.ndarray]

    def max(self, path: str, role: str) -> int:
        """The most any rank of `role` ("engine" or "trainer") adds on `path`."""
        x = self.by_path[path]
        part = x[self.trainer_world :] if role == "engine" else x[: self.trainer_world]
        return int(part.max(initial=0))

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {p: {r: self.max(p, r) for r in ("engine", "trainer")} for p in PATHS}


def misc_bytes(refit: RefitPlan) -> int:
    """Bytes of misc tensors every engine rank holds whole while it loads them."""
    return sum(e.nbytes for e in refit.misc)


def extra_memory(refit: RefitPlan, plan: Plan) -> ExtraMemory:
    world, t = refit.world, refit.trainer_world
    engine = (np.arange(world) >= t).astype(np.int64)
    misc = misc_bytes(refit) * engine
    st = plan.stats
    # forwarders hold no source box (`xfer.relay`): everything they send is forwarded
    forwards = np.isin(np.arange(world), plan.relay.forwarder)
    p2p = 2 * (np.where(forwards, 0, st.peak_send_round) + st.peak_recv_round) + misc
    items = refit.items
    tensor = [int(np.prod(it.src.shape)) * it.itemsize for it in items]
    largest_cell = max(
        (int(it.src.geometry.cell_numel().max(initial=0)) * it.itemsize for it in items),
        default=0,
    )
    golden = np.full(world, largest_cell, dtype=np.int64) + misc
    baseline = misc + engine * max(tensor, default=0)
    stage_of = {x.name: x.stage for x in refit.report}
    for s, ranks in enumerate(refit.stage_ranks):
        mine = [i for i, it in enumerate(items) if stage_of[it.name] == s]
        if not mine:
            continue
        gathered = max(remote_bytes(items[i], ranks[0]) for i in mine)
        baseline[ranks[0]] += max(tensor[i] for i in mine) + gathered
    return ExtraMemory(t, {"p2p": p2p, "golden": golden, "baseline": baseline})


def remote_bytes(it: ReshardItem, root: int) -> int:
    """Bytes of `it` that `root` must gather: the cells it does not hold itself."""
    remote, _ = remote_cells(it, root)
    return int(it.src.geometry.cell_numel()[remote].sum()) * it.itemsize


def zero_copy_extra(refit: RefitPlan, plan: Plan, ranks: list[int]) -> dict[int, int]:
    """The p2p extra bytes of each of `ranks` with the runtime's zero copy (see above)."""
    misc = misc_bytes(refit)
    out = {}
    for rank in ranks:
        src = _byte_views(plan, rank, "src")
        dst = _byte_views(plan, rank, "dst")
        staged = staging_need(build_program(plan, rank), src, dst)
        out[rank] = staged + (misc if rank >= refit.trainer_world else 0)
    return out


def _byte_views(plan: Plan, rank: int, side: str) -> list[Local | None]:
    """Contiguous stand-ins (no storage) for this rank's local tensors, as byte views."""
    views: list[Local | None] = []
    for it in plan.items:
        layout = it.src if side == "src" else it.dst
        shape = layout.local_shape(rank) if layout.holds(rank) else None
        views.append(
            None if shape is None else as_bytes(torch.empty(shape, dtype=it.dtype, device="meta"))
        )
    return views
