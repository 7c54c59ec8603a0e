"""`plan_refit`: pure planning of a refit from the two sides' descriptions.

Ranks. Trainer ranks keep their numbers ``0..T-1``; rank ``j`` of engine replica ``i`` is
refit rank ``T + i*R + j``. Pipeline stage ``s`` gets its own communication group: the
stage's trainer ranks (group ranks ``0..n-1``, in order) and then every engine rank. Group
rank 0, the stage's first trainer rank, owns the stage's misc parameters.

Classification (fail-safe). A parameter is *bulk* when the engine gives it a layout and the
trainer does not flag it (`SourceParam.reason`); it is resharded by xfer straight into the
engine's storage. Otherwise it is *misc*: the stage owner
sends the whole tensor in a packed broadcast and the engine loads it through its own weight
loading. A misc parameter the owner does not hold whole is first gathered to the owner by
the same xfer plan (a destination layout on the owner alone). Unknown never means wrong.

Output: a `RefitPlan` with one `StagePlan` per stage (its group, its xfer items over group
ranks, its misc list in a fixed order, cut into buckets) and a per-parameter report. It is an
immutable, picklable value; every rank receives it and builds its own xfer plans from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from refit.errors import RefitError
from refit.spec import Axis, DestParam, EngineSpec, Kind, SourceParam, TrainerSpec, param_bytes
from xfer import Layout, Mesh, Replicate, ReshardItem

__all__ = ["Classified", "MiscEntry", "RefitPlan", "StagePlan", "plan_refit"]

DEFAULT_MISC_BUCKET_BYTES = 64 << 20
MISC_ALIGN = 16  # bytes; a multiple of every element size


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
    bucket: int
    offset: int  # bytes into the bucket
    gathered: int | None  # index of the gather item in `StagePlan.items`, if gathered

    @property
    def nbytes(self) -> int:
        return param_bytes(self.shape, self.dtype)


@dataclass(frozen=True)
class StagePlan:
    stage: int
    ranks: tuple[int, ...]  # refit ranks of the group: the stage's trainer ranks, then engines
    trainers: int  # how many of `ranks` are trainer ranks
    items: tuple[ReshardItem, ...]  # bulk items (first `bulk`), then misc gathers to rank 0
    bulk: int
    misc: tuple[MiscEntry, ...]
    buckets: tuple[int, ...]  # bytes of each misc bucket

    def group_rank(self, refit_rank: int) -> int | None:
        try:
            return self.ranks.index(refit_rank)
        except ValueError:
            return None


@dataclass(frozen=True)
class RefitPlan:
    trainer_world: int
    replica_world: int
    replicas: int
    stages: tuple[StagePlan, ...]
    report: tuple[Classified, ...]

    @property
    def world(self) -> int:
        return self.trainer_world + self.replicas * self.replica_world

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
            f"per replica ({100 * self.bulk_fraction:.2f}% bulk), {len(self.stages)} stages, "
            f"{self.trainer_world} trainer ranks -> {self.replicas} x {self.replica_world} "
            f"engine ranks"
        )


def remap(layout: Layout, table: np.ndarray, axes: Sequence[str] | None = None) -> Layout:
    """The same layout with mesh ranks replaced by ``table[rank]``."""
    mesh = layout.mesh
    return Layout(
        Mesh(table[mesh.ranks], axes if axes is not None else mesh.axes),
        layout.placements,
        layout.shape,
    )


def _check(trainer: TrainerSpec, engines: Sequence[EngineSpec]) -> list[str]:
    out: list[str] = []
    if not engines:
        return ["no engine replicas given"]
    first = engines[0]
    for i, e in enumerate(engines[1:], start=1):
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


def owner_layout(shape: tuple[int, ...]) -> Layout:
    """A whole tensor on group rank 0 (the stage owner): a misc tensor's gather target."""
    return Layout(Mesh([0], ("owner",)), [Replicate()], shape)


def plan_refit(
    trainer: TrainerSpec,
    engines: Sequence[EngineSpec],
    *,
    misc_bucket_bytes: int = DEFAULT_MISC_BUCKET_BYTES,
) -> RefitPlan:
    """Classify every parameter and plan each pipeline stage (pure). Raises one `RefitError`
    listing every inconsistency between the two sides' descriptions."""
    problems = _check(trainer, engines)
    if problems:
        raise RefitError(problems)
    t, r, n = trainer.world, engines[0].world, len(engines)
    engine_ranks = tuple(range(t, t + n * r))
    dests = {d.name: d for d in engines[0].params}
    by_stage: list[list[tuple[SourceParam, DestParam]]] = [[] for _ in trainer.stage_ranks]
    for p in trainer.params:
        if p.name in dests:
            by_stage[p.stage].append((p, dests[p.name]))
    stages, report = [], []
    for s, pairs in enumerate(by_stage):
        ranks = tuple(trainer.stage_ranks[s]) + engine_ranks
        table = np.full(t + n * r, -1, dtype=np.int64)
        table[list(ranks)] = np.arange(len(ranks))
        # replica i rank j -> group rank of refit rank t + i*r + j
        replica_table = table[t:].reshape(n, r)
        bulk: list[ReshardItem] = []
        misc_params: list[SourceParam] = []
        for src, dst in pairs:
            nbytes = param_bytes(src.shape, src.dtype)
            if dst.layout is not None and not src.reason:
                src_l = remap(src.layout, table)
                dmesh = dst.layout.mesh
                stacked = replica_table[:, dmesh.ranks.reshape(-1)].reshape(n, *dmesh.shape)
                dst_l = Layout(
                    Mesh(stacked, (Axis.REPLICA, *dmesh.axes)),
                    (Replicate(), *dst.layout.placements),
                    dst.shape,
                )
                bulk.append(ReshardItem(src_l, dst_l, src.dtype, src.name))
                report.append(Classified(src.name, Kind.BULK, nbytes, s, dst.target))
            else:
                misc_params.append(src)
                reason = (
                    f"trainer: {src.reason}"
                    if src.reason
                    else dst.reason or "the engine gives it no layout"
                )
                report.append(Classified(src.name, Kind.MISC, nbytes, s, dst.target, reason))
        items = list(bulk)
        owner = trainer.stage_ranks[s][0]
        misc: list[MiscEntry] = []
        buckets: list[int] = []
        for src in misc_params:
            gathered = None
            if not (src.layout.holds(owner) and src.layout.local_shape(owner) == src.shape):
                gathered = len(items)
                items.append(
                    ReshardItem(
                        remap(src.layout, table),
                        owner_layout(src.shape),
                        src.dtype,
                        src.name,
                    )
                )
            nbytes = param_bytes(src.shape, src.dtype)
            # each tensor starts MISC_ALIGN-aligned, so a receiver can view its bytes as dtype
            start = -(-buckets[-1] // MISC_ALIGN) * MISC_ALIGN if buckets else 0
            if not buckets or (buckets[-1] and start + nbytes > misc_bucket_bytes):
                buckets.append(0)
                start = 0
            misc.append(
                MiscEntry(src.name, src.shape, src.dtype, len(buckets) - 1, start, gathered)
            )
            buckets[-1] = start + nbytes
        stages.append(
            StagePlan(
                stage=s,
                ranks=ranks,
                trainers=len(trainer.stage_ranks[s]),
                items=tuple(items),
                bulk=len(bulk),
                misc=tuple(misc),
                buckets=tuple(buckets),
            )
        )
    return RefitPlan(
        trainer_world=t,
        replica_world=r,
        replicas=n,
        stages=tuple(stages),
        report=tuple(report),
    )
