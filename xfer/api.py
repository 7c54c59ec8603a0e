"""The entry points: `xferdtensor` (one tensor), `xferdtensors` and `Resharder` (a batch).

Every rank of the communicator calls them with the same sequence of tensors. A rank passes a
`DTensorRef` (its local shard and the layout) for each side, or None for a side it holds
nothing of; layouts are learned from the ranks that hold them. `Resharder` is the form to use
every step: it plans once and replays.

Paths: ``"golden"`` (broadcast reference), ``"p2p"`` (the plan as grouped point-to-point),
``"m2n"`` (NVIDIA's native reshard; an error where it does not apply) and ``"auto"``: m2n for
the items every rank agrees it fits, p2p for the rest.

Each run first agrees over the comm on the inputs (every rank's local problems and plan
fingerprint, see `xfer.validate`), so bad input raises the same `XferError` on every rank
before any data moves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from xfer import m2n, wire
from xfer.comm import Comm
from xfer.delta import Baselines, apply_received, run_p2p_delta
from xfer.errors import XferError
from xfer.execute import XferStats, run_p2p
from xfer.golden import run_golden
from xfer.layout import Layout
from xfer.mesh import Mesh
from xfer.plan import DEFAULT_BUCKET_BYTES, Plan, ReshardItem, plan_reshard
from xfer.program import RankProgram, build_program
from xfer.segments import Local, Segments
from xfer.staging import Staging
from xfer.validate import agree, check_locals

__all__ = ["PATHS", "DTensorRef", "Delta", "Path", "Resharder", "xferdtensor", "xferdtensors"]

log = logging.getLogger(__name__)

Path = Literal["auto", "golden", "p2p", "m2n"]
PATHS: tuple[str, ...] = ("auto", "golden", "p2p", "m2n")


@dataclass(frozen=True)
class DTensorRef:
    """A local shard and the layout of the global tensor it belongs to.

    `local` may be any strided view, or `Segments` (views stacked along dim 0); it is None on
    ranks outside the layout's mesh (and may be None for an empty box).
    """

    local: torch.Tensor | Segments | None
    layout: Layout

    @classmethod
    def from_dtensor(cls, dt: Any, *, rank_map: Mapping[int, int] | None = None) -> DTensorRef:
        """From a torch `DTensor`. Its device mesh holds global ranks; `rank_map` translates
        them to communicator ranks (not needed when the comm is the default group)."""
        dm = dt.device_mesh
        ranks = dm.mesh.tolist()
        if rank_map is not None:
            import numpy as np

            ranks = np.vectorize(lambda r: rank_map[int(r)])(dm.mesh.numpy()).tolist()
        names = dm.mesh_dim_names or tuple(f"axis{i}" for i in range(dm.ndim))
        layout = Layout(Mesh(ranks, names), dt.placements, tuple(dt.shape))
        return cls(dt.to_local(), layout)


@dataclass(frozen=True)
class Delta:
    """A delta run's request: this rank's `baselines`, the `version` the run produces, and
    the version the delta is `against` (None: run dense and record the baselines)."""

    baselines: Baselines
    version: int
    against: int | None = None
    # receivers only bring their baselines to `version`, writing no destination (pass None
    # for them); `Resharder.apply` writes them afterwards
    receive_only: bool = False
    # items whose destinations on this rank persist between runs holding what the last run
    # wrote: patched in place, no received baseline kept (`xfer.delta`)
    in_place: frozenset[int] = frozenset()


def _check_path(path: str) -> None:
    if path not in PATHS:
        raise XferError(f"path must be one of {PATHS}, got {path!r}")


class Resharder:
    """Plan a batch of reshards once; `run` it at every step.

    ``Resharder(items, comm)`` plans on construction (pure, no communication; every rank
    builds the same plan from the same items). `run` takes this rank's local tensors, in
    item order, and returns what this rank did. `bucket_bytes`, `node_of`, `relay` and
    `part_bytes` are `plan_reshard`'s.
    """

    def __init__(
        self,
        items: Sequence[ReshardItem],
        comm: Comm,
        *,
        path: Path = "auto",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        node_of: Sequence[int] | Mapping[int, int] | None = None,
        relay: bool | int | None = None,
        part_bytes: int | None = None,
    ) -> None:
        _check_path(path)
        self.comm = comm
        self.path: Path = path
        self._bucket_bytes = bucket_bytes
        self._node_of = node_of
        self._relay = relay
        self._part_bytes = part_bytes
        self.plan: Plan = self._plan_of(items, relay)
        self._program: RankProgram | None = None
        self._direct_program: RankProgram | None = None
        self._m2n_meta: list[str | None] | None = None  # per item, from metadata
        self._rest: dict[tuple[int, ...], tuple[Plan, RankProgram]] = {}
        self.staging = Staging()  # p2p staging (may be replaced per run to share it)
        self._golden = Staging()  # the golden path's scratch, outside any staging budget

    def _plan_of(self, items: Sequence[ReshardItem], relay: bool | int | None) -> Plan:
        """A plan of `items` with this resharder's options (and `relay`)."""
        return plan_reshard(
            items,
            bucket_bytes=self._bucket_bytes,
            world_size=self.comm.size,
            node_of=self._node_of,
            relay=relay,
            part_bytes=self._part_bytes,
        )

    @property
    def items(self) -> tuple[ReshardItem, ...]:
        return self.plan.items

    @property
    def program(self) -> RankProgram:
        """This rank's share of the plan (built on first use, then kept)."""
        if self._program is None:
            self._program = build_program(self.plan, self.comm.rank)
        return self._program

    @property
    def direct_program(self) -> RankProgram:
        """This rank's share of the plan without relay (what delta runs replay: a relayed
        message would forward dense bytes)."""
        if not len(self.plan.relay):
            return self.program
        if self._direct_program is None:
            direct = self._plan_of(self.plan.items, relay=False)
            self._direct_program = build_program(direct, self.comm.rank)
        return self._direct_program

    def run(
        self,
        srcs: Sequence[Local | None],
        dsts: Sequence[Local | None],
        *,
        stream: Any = None,
        path: Path | None = None,
        staging: Staging | None = None,
        delta: Delta | None = None,
    ) -> XferStats:
        """Move this step's tensors. `path` overrides the resharder's path for this run;
        `staging` replaces the resharder's own staging buffers (to share them).

        `delta` (p2p only, on every rank alike) sends only what changed since the run its
        baselines come from (`xfer.delta`): ``Delta(baselines, version, against)``, with
        ``against=None`` for a dense run that records the baselines. Every rank agrees on
        ``against`` before data moves; a rank whose baselines hold another version makes
        every rank raise the same `XferError`, naming it."""
        path = path or self.path
        _check_path(path)
        t0 = time.perf_counter()
        items = self.plan.items
        problems = check_locals(
            items, self.comm.rank, srcs, dsts, destinations=not (delta and delta.receive_only)
        )
        if delta is not None:
            return self._run_delta(srcs, dsts, problems, path, delta, stream, staging)
        use_m2n = self._m2n_items(path, srcs, dsts, problems)
        if path == "golden":
            return run_golden(items, srcs, dsts, self.comm, stream=stream, staging=self._golden)
        if not use_m2n:
            stats = run_p2p(
                self.program, srcs, dsts, self.comm, stream=stream, staging=staging or self.staging
            )
            log.debug(
                "rank %d: p2p %d B out, %d B in, %d rounds, %.4f s",
                self.comm.rank,
                stats.bytes_sent,
                stats.bytes_received,
                stats.rounds,
                stats.seconds,
            )
            return stats
        # local_reason() passed only plain tensors (or None) for these items
        m2n.run_m2n(
            [items[i] for i in use_m2n],
            [_plain(srcs[i]) for i in use_m2n],
            [_plain(dsts[i]) for i in use_m2n],
            self.comm,
            stream=stream,
        )
        rest = [i for i in range(len(items)) if i not in set(use_m2n)]
        stats = XferStats("m2n", 0.0, 0, 0, 0, 0, 0, 0, 0)
        if rest:
            _, prog = self._rest_plan(tuple(rest))
            stats = run_p2p(
                prog,
                [srcs[i] for i in rest],
                [dsts[i] for i in rest],
                self.comm,
                stream=stream,
                staging=staging or self.staging,
            )
        return replace(stats, path="m2n+p2p" if rest else "m2n", seconds=time.perf_counter() - t0)

    def _run_delta(
        self,
        srcs: Sequence[Local | None],
        dsts: Sequence[Local | None],
        problems: list[str],
        path: str,
        delta: Delta,
        stream: Any,
        staging: Staging | None,
    ) -> XferStats:
        if path not in ("auto", "p2p"):
            problems = [*problems, f"a delta run takes path 'p2p' (or 'auto'), not {path!r}"]
        held = delta.baselines.version
        if delta.against is not None and held != delta.against:
            problems = [
                *problems,
                f"asked for a delta against version {delta.against}, but this rank's "
                f"baselines hold {'none' if held is None else f'version {held}'}: run dense",
            ]
        against = "dense" if delta.against is None else f"delta against {delta.against}"
        agree(self.comm, problems, f"{self.plan.fingerprint}|p2p|{against}")
        try:
            return run_p2p_delta(
                self.direct_program,
                [it.itemsize for it in self.plan.items],
                srcs,
                dsts,
                self.comm,
                delta.baselines,
                version=delta.version,
                against=delta.against,
                receive_only=delta.receive_only,
                in_place=delta.in_place,
                stream=stream,
                staging=staging or self.staging,
            )
        except ValueError as e:
            raise XferError(str(e)) from None

    def apply(self, dsts: Sequence[Local | None], baselines: Baselines) -> int:
        """After a receive-only delta run: write what arrived into this rank's destinations
        (local: no communication); the bytes written. Bad destinations raise `XferError`
        on this rank before anything is written."""
        rank = self.comm.rank
        problems = check_locals(self.plan.items, rank, [None] * len(dsts), dsts, sources=False)
        if problems:
            raise XferError(problems)
        if baselines.version is None:
            raise XferError(f"rank {rank}: nothing received to apply (no baselines)")
        return apply_received(self.direct_program, dsts, baselines)

    def verify(self, srcs: Sequence[Local | None], dsts: Sequence[Local | None]) -> list[str]:
        """After `run`, on every rank: the items whose destination box on this rank differs
        from what its senders sent (`xfer.checksum.verify`); empty when all match."""
        from xfer.checksum import verify

        return verify(self.comm, self.plan, self.program, srcs, dsts)

    def release_staging(self) -> None:
        """Free the buffers kept between runs (the next run allocates them again)."""
        self.staging.release()
        self._golden.release()

    def _m2n_items(
        self,
        path: str,
        srcs: Sequence[Local | None],
        dsts: Sequence[Local | None],
        problems: list[str],
    ) -> list[int]:
        """Agree with every rank on the inputs, the plan and the path (raising the same
        `XferError` everywhere if anything is wrong), and return the items taking m2n.

        Only items m2n fits by metadata (the same on every rank) are candidates; a rank
        sends reasons (the slow exchange) only when it cannot run some candidate itself, so
        with no candidate (any comm but an `NcclComm`) the agreement is the 18-byte one."""
        candidates: list[int] = []
        if path in ("auto", "m2n"):
            if self._m2n_meta is None:
                self._m2n_meta = [m2n.unsupported_reason(it, self.comm) for it in self.items]
            candidates = [i for i, r in enumerate(self._m2n_meta) if r is None]
            if path == "m2n" and len(candidates) < len(self.items):
                bad = [
                    f"path='m2n' does not apply to {self.items[i].label!r}: {r}"
                    for i, r in enumerate(self._m2n_meta)
                    if r is not None
                ]
                problems = [*problems, *bad[:20]]
        local_why: list[str | None] | None = None
        if candidates and not problems:
            mine = m2n.rank_reason()
            why: list[str | None] = [None] * len(self.items)
            for i in candidates:
                why[i] = mine or m2n.local_reason(srcs[i]) or m2n.local_reason(dsts[i])
            local_why = why if any(why) else None
        flags = agree(self.comm, problems, f"{self.plan.fingerprint}|{path}", local_why)
        rejected: dict[int, str] = {}
        for rank, rank_flags in enumerate(flags):
            for i, w in enumerate(rank_flags or []):
                if w and i not in rejected:
                    rejected[i] = f"rank {rank}: {w}"
        if path == "m2n" and rejected:
            bad = [f"{self.items[i].label!r}: {w}" for i, w in sorted(rejected.items())]
            raise XferError([f"path='m2n' does not apply to {b}" for b in bad[:20]])
        return [i for i in candidates if i not in rejected]

    def _rest_plan(self, rest: tuple[int, ...]) -> tuple[Plan, RankProgram]:
        if rest not in self._rest:
            sub = self._plan_of([self.plan.items[i] for i in rest], self._relay)
            self._rest[rest] = (sub, build_program(sub, self.comm.rank))
        return self._rest[rest]


def xferdtensors(
    srcs: Sequence[DTensorRef | None],
    dsts: Sequence[DTensorRef | None],
    comm: Comm,
    *,
    path: Path = "auto",
    stream: Any = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    names: Sequence[str] | None = None,
) -> XferStats:
    """Reshard a batch of tensors in one plan. Ranks learn the layouts they lack from the
    ranks that pass them; all layouts of one tensor must agree across ranks."""
    _check_path(path)
    if len(srcs) != len(dsts):
        raise XferError(f"{len(srcs)} source refs but {len(dsts)} destination refs")
    names = list(names) if names is not None else [f"tensor {i}" for i in range(len(srcs))]
    mine = [
        [
            None
            if r is None
            else [
                wire.layout_to_json(r.layout),
                None if r.local is None else wire.dtype_name(r.local.dtype),
            ]
            for r in (s, d)
        ]
        for s, d in zip(srcs, dsts, strict=True)
    ]
    shared = agree(comm, [], f"{len(srcs)} tensors", mine)
    problems: list[str] = []
    items = []
    for i, name in enumerate(names):
        lay: dict[str, Layout] = {}
        dtypes: dict[torch.dtype, list[int]] = {}
        for side, k in (("source", 0), ("destination", 1)):
            seen: dict[Layout, list[int]] = {}
            for rank, per_rank in enumerate(shared):
                try:
                    entry = per_rank[i][k]
                    if entry is None:
                        continue
                    layout = wire.layout_from_json(entry[0], f"rank {rank} {side} layout")
                    dtype = None if entry[1] is None else wire.dtype_from_name(entry[1])
                except (wire.WireError, IndexError, TypeError, KeyError) as e:
                    problems.append(f"tensor {name!r}: rank {rank} sent an unreadable {side}: {e}")
                    continue
                seen.setdefault(layout, []).append(rank)
                if dtype is not None:
                    dtypes.setdefault(dtype, []).append(rank)
            if not seen:
                problems.append(f"tensor {name!r}: no rank passed a {side} layout")
            elif len(seen) > 1:
                desc = "; ".join(f"ranks {rs}: {lay_!r}" for lay_, rs in seen.items())
                problems.append(f"tensor {name!r}: ranks disagree on the {side} layout: {desc}")
            else:
                lay[side] = next(iter(seen))
        if len(dtypes) > 1:
            desc = "; ".join(f"{dt} on ranks {rs}" for dt, rs in dtypes.items())
            problems.append(f"tensor {name!r}: source and destination dtypes differ: {desc}")
        if not dtypes:
            problems.append(f"tensor {name!r}: no rank passed a local tensor, dtype unknown")
        if len(lay) == 2 and len(dtypes) == 1:
            items.append(ReshardItem(lay["source"], lay["destination"], next(iter(dtypes)), name))
    if problems:
        raise XferError(problems)
    resharder = Resharder(items, comm, path=path, bucket_bytes=bucket_bytes)
    return resharder.run(
        [None if s is None else s.local for s in srcs],
        [None if d is None else d.local for d in dsts],
        stream=stream,
    )


def xferdtensor(
    src: DTensorRef | None,
    dst: DTensorRef | None,
    comm: Comm,
    *,
    path: Path = "auto",
    stream: Any = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    name: str = "tensor",
) -> XferStats:
    """Reshard one tensor from its source layout into its destination layout, in place in
    `dst.local`. `src`/`dst` are None on ranks that hold no such side."""
    return xferdtensors(
        [src], [dst], comm, path=path, stream=stream, bucket_bytes=bucket_bytes, names=[name]
    )


def _plain(t: Local | None) -> torch.Tensor | None:
    assert t is None or isinstance(t, torch.Tensor)
    return t
