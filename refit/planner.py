"""`plan_refit`: pure planning of a refit from the two sides' descriptions.

Ranks. Trainer ranks keep their numbers ``0..T-1``; rank ``j`` of engine replica ``i`` is
refit rank ``T + i*R + j``. All of them form one communicator, and a refit is one xfer plan
over it: every trainer pipeline stage sends at once, each rank's bytes per round capped by the
bucket, so the number of stages in flight is never a memory question. One communicator also
means every rank issues its operations in one order, which NCCL requires.

Classification (fail-safe). A parameter is *bulk* when the engine gives it a layout and the
trainer does not flag it (`SourceParam.reason`); it is resharded by xfer straight into the
engine's storage. Otherwise it is *misc*: the engine loads it through its own weight loading,
so every engine rank needs the whole tensor; it is an xfer item too, from the trainer's
shards (wherever they are, replicas sharing the sending) to a whole copy on every engine
rank, received into a buffer the engine hands to its loader. Unknown never means wrong.

Output: a `RefitPlan` (the items in a fixed order, bulk first, then misc; the misc list; a
per-parameter report). It is an immutable value; every rank computes the same one from the
same descriptions (`refit.setup.RankSetup` carries them) and builds its xfer plan from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from refit.errors import RefitError
from refit.spec import Axis, EngineSpec, Kind, TrainerSpec, param_bytes
from xfer import Layout, Mesh, Replicate, ReshardItem

__all__ = ["Classified", "MiscEntry", "RefitPlan", "plan_refit"]


@dataclass(frozen=True)
class Classified:
    name: str
    kind: Kind
    nbytes: int
    stage: int
    target: str
    reason: str = ""


@dataclass(frozen=True)
class MiscEntry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    item: int  # its index in `RefitPlan.items`: whole on every engine rank

    @property
    def nbytes(self) -> int:
        return param_bytes(self.shape, self.dtype)


@dataclass(frozen=True)
class RefitPlan:
    trainer_world: int
    replica_world: int
    replicas: int
    stage_ranks: tuple[tuple[int, ...], ...]  # trainer ranks of each pipeline stage
    items: tuple[ReshardItem, ...]  # over refit ranks: bulk items (first `bulk`), then misc
    bulk: int
    misc: tuple[MiscEntry, ...]
    report: tuple[Classified, ...]

    @property
    def world(self) -> int:
        return self.trainer_world + self.replicas * self.replica_world

    @property
    def stages(self) -> int:
        return len(self.stage_ranks)

    def engine_rank(self, replica: int, rank: int) -> int:
        return self.trainer_world + replica * self.replica_world + rank

    @property
    def bulk_bytes(self) -> int:
        return sum(c.nbytes for c in self.report if c.kind == Kind.BULK)

    @property
    def misc_bytes(self) -> int:
        return sum(c.nbytes for c in self.report if c.kind == Kind.MISC)

    @property
    def bulk_fraction(self) -> float:
        total = self.bulk_bytes + self.misc_bytes
        return self.bulk_bytes / total if total else 1.0

    def summary(self) -> str:
        nb = sum(1 for c in self.report if c.kind == Kind.BULK)
        nm = len(self.report) - nb
        return (
            f"{len(self.report)} params ({nb} bulk, {nm} misc), "
            f"{self.bulk_bytes / 2**20:.1f} MiB bulk + {self.misc_bytes / 2**20:.1f} MiB misc "
            f"per replica ({100 * self.bulk_fraction:.2f}% bulk), {self.stages} stages, "
            f"{self.trainer_world} trainer ranks -> {self.replicas} x {self.replica_world} "
            f"engine ranks"
        )


def _check(trainer: TrainerSpec, engines: Sequence[EngineSpec]) -> list[str]:
    out: list[str] = []
    if not engines:
        return ["no engine replicas given"]
    first = engines[0]
    for i, e in enumerate(engines[1:], start=1):
        if e.device != first.device:
            out.append(f"engine replica {i} is on {e.device} but replica 0 on {first.device}")
        if e.world != first.world:
            out.append(f"engine replica {i} has {e.world} ranks but replica 0 has {first.world}")
        a = {p.name: p for p in first.params}
        b = {p.name: p for p in e.params}
        if a.keys() != b.keys():
            only0 = sorted(a.keys() - b.keys())[:5]
            only_i = sorted(b.keys() - a.keys())[:5]
            out.append(
                f"engine replicas 0 and {i} hold different parameters (only in 0: {only0}; "
                f"only in {i}: {only_i})"
            )
        else:
            diff = [n for n in a if a[n] != b[n]][:5]
            if diff:
                out.append(f"engine replicas 0 and {i} describe {diff} differently")
    seen_stage_ranks: set[int] = set()
    for s, ranks in enumerate(trainer.stage_ranks):
        for r in ranks:
            if not 0 <= r < trainer.world:
                out.append(f"stage {s} lists trainer rank {r} outside 0..{trainer.world - 1}")
            if r in seen_stage_ranks:
                out.append(f"trainer rank {r} is in more than one pipeline stage")
            seen_stage_ranks.add(r)
    src = {}
    for p in trainer.params:
        if p.name in src:
            out.append(f"the trainer describes {p.name!r} twice")
        src[p.name] = p
        if not 0 <= p.stage < trainer.stages:
            out.append(f"{p.name!r}: stage {p.stage} outside 0..{trainer.stages - 1}")
            continue
        stray = sorted(set(p.layout.mesh.flat) - set(trainer.stage_ranks[p.stage]))
        if stray:
            out.append(
                f"{p.name!r}: its layout {p.layout!r} uses ranks {stray[:8]} that are not in "
                f"stage {p.stage} (ranks {list(trainer.stage_ranks[p.stage])[:8]}...)"
            )
        if p.layout.shape != p.shape:
            out.append(f"{p.name!r}: layout shape {list(p.layout.shape)} != {list(p.shape)}")
    for d in first.params:
        sp = src.get(d.name)
        if sp is None:
            out.append(
                f"{d.name!r} (engine {d.target}, {list(d.shape)} {d.dtype}) is missing on the "
                "trainer"
            )
            continue
        if sp.shape != d.shape:
            out.append(
                f"{d.name!r}: trainer shape {list(sp.shape)} != engine shape {list(d.shape)} "
                f"({d.target})"
            )
        if sp.dtype != d.dtype:
            out.append(
                f"{d.name!r}: precision mismatch: trainer sends {sp.dtype}, engine holds "
                f"{d.dtype} ({d.target}); convert on one side first"
            )
        if d.layout is not None:
            if d.layout.shape != d.shape:
                out.append(
                    f"{d.name!r}: engine layout shape {list(d.layout.shape)} != {list(d.shape)}"
                )
            if d.layout.mesh.max_rank >= first.world:
                out.append(
                    f"{d.name!r}: engine layout {d.layout!r} uses ranks outside the replica's "
                    f"{first.world}"
                )
    dest_names = {d.name for d in first.params}
    extra = [
        n for n in src if n not in dest_names and not any(n.startswith(i) for i in first.ignored)
    ]
    if extra:
        out.append(
            f"the trainer sends {len(extra)} parameters the engine does not hold: {extra[:8]}"
        )
    return out


def plan_refit(trainer: TrainerSpec, engines: Sequence[EngineSpec]) -> RefitPlan:
    """Classify every parameter and plan the refit (pure). Raises one `RefitError` listing
    every inconsistency between the two sides' descriptions."""
    problems = _check(trainer, engines)
    if problems:
        raise RefitError(problems)
    t, r, n = trainer.world, engines[0].world, len(engines)
    # replica i rank j -> refit rank t + i*r + j
    replica_table = np.arange(t, t + n * r, dtype=np.int64).reshape(n, r)
    engines_mesh = Mesh(replica_table, (Axis.REPLICA, "rank"))
    dests = {d.name: d for d in engines[0].params}
    pairs = sorted(
        ((p, dests[p.name]) for p in trainer.params if p.name in dests),
        key=lambda pd: pd[0].stage,
    )
    bulk: list[ReshardItem] = []
    misc_items: list[ReshardItem] = []
    report = []
    for src, dst in pairs:
        nbytes = param_bytes(src.shape, src.dtype)
        if dst.layout is not None and not src.reason:
            dmesh = dst.layout.mesh
            stacked = replica_table[:, dmesh.ranks.reshape(-1)].reshape(n, *dmesh.shape)
            dst_l = Layout(
                Mesh(stacked, (Axis.REPLICA, *dmesh.axes)),
                (Replicate(), *dst.layout.placements),
                dst.shape,
            )
            bulk.append(ReshardItem(src.layout, dst_l, src.dtype, src.name))
            report.append(Classified(src.name, Kind.BULK, nbytes, src.stage, dst.target))
        else:
            whole = Layout(engines_mesh, (Replicate(), Replicate()), src.shape)
            misc_items.append(ReshardItem(src.layout, whole, src.dtype, src.name))
            reason = (
                f"trainer: {src.reason}"
                if src.reason
                else dst.reason or "the engine gives it no layout"
            )
            report.append(Classified(src.name, Kind.MISC, nbytes, src.stage, dst.target, reason))
    misc = tuple(
        MiscEntry(it.name, it.src.shape, it.dtype, len(bulk) + k) for k, it in enumerate(misc_items)
    )
    return RefitPlan(
        trainer_world=t,
        replica_world=r,
        replicas=n,
        stage_ranks=trainer.stage_ranks,
        items=tuple(bulk + misc_items),
        bulk=len(bulk),
        misc=misc,
        report=tuple(report),
    )
