"""`Layout`: how a global tensor is split over a mesh, and the box each rank holds.

A layout is a mesh, one placement per mesh axis (torch's own DTensor `Shard(dim)` and
`Replicate()`), and the global shape. The box of a rank is, per tensor dim, the interval
``[start, stop)`` it holds. Splitting follows DTensor exactly:

* a dim sharded over an axis of size ``k`` is cut like ``torch.chunk``: pieces of
  ``ceil(n / k)``, the last ones shorter or empty (an empty piece starts at ``n``);
* several axes may shard the same dim; they nest left to right (the second axis cuts the piece
  the first one left);
* replicated axes copy the box.

Distinct boxes of one layout never partially overlap: per dim the intervals partition
``[0, n)``, so the boxes tile the tensor into *cells*, each held by every rank of one replica
group. `Geometry` carries that tiling as numpy arrays over mesh positions, computed once per
(mesh shape, placements, shape) and shared by every layout with the same geometry, so planning
100k tensors costs a dictionary lookup for most of them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from xfer.errors import XferError
from xfer.mesh import Mesh

__all__ = ["Geometry", "Layout", "Placement", "Replicate", "Shard", "placement_str"]


def placement_str(p: Placement) -> str:
    """Short form: ``S(0)``, ``R``."""
    return f"S({p.dim})" if isinstance(p, Shard) else "R"


@dataclass(frozen=True, eq=False)
class Geometry:
    """The boxes of one layout, indexed by mesh position (row-major), as read-only arrays.

    ``starts[i]``/``stops[i]`` is the box of mesh position ``i``. ``cell_of[i]`` names its
    cell; ``cell_starts[u]``/``cell_stops[u]`` is cell ``u``'s box and ``members[u]`` the mesh
    positions holding it (padded with -1 to ``members.shape[1]`` columns). Cells are sorted by
    box, so the numbering is the same on every rank.
    """

    starts: np.ndarray
    stops: np.ndarray
    cell_of: np.ndarray
    cell_starts: np.ndarray
    cell_stops: np.ndarray
    members: np.ndarray
    member_count: np.ndarray

    @property
    def ncells(self) -> int:
        return int(self.cell_starts.shape[0])

    def cell_numel(self) -> np.ndarray:
        return np.prod(self.cell_stops - self.cell_starts, axis=1, dtype=np.int64)


@functools.lru_cache(maxsize=4096)
def geometry(
    mesh_shape: tuple[int, ...], placements: tuple[Placement, ...], shape: tuple[int, ...]
) -> Geometry:
    """Boxes for every mesh position; a pure function of its (hashable) arguments."""
    npos = math.prod(mesh_shape)
    ndim = len(shape)
    coords = np.indices(mesh_shape, dtype=np.int64).reshape(len(mesh_shape), npos)
    starts = np.zeros((npos, ndim), dtype=np.int64)
    sizes = np.tile(np.asarray(shape, dtype=np.int64), (npos, 1))
    for axis, p in enumerate(placements):
        if not isinstance(p, Shard):
            continue
        k, d, c = mesh_shape[axis], p.dim, coords[axis]
        cur = sizes[:, d]
        chunk = -(-cur // k)
        lo = np.minimum(chunk * c, cur)
        hi = np.minimum(lo + chunk, cur)
        starts[:, d] += lo
        sizes[:, d] = hi - lo
    stops = starts + sizes
    boxes = np.concatenate([starts, stops], axis=1)
    cells, cell_of = np.unique(boxes, axis=0, return_inverse=True)
    cell_of = cell_of.reshape(-1)
    order = np.argsort(cell_of, kind="stable")
    counts = np.bincount(cell_of, minlength=len(cells))
    width = int(counts.max()) if len(counts) else 0
    members = np.full((len(cells), width), -1, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    col = np.arange(npos) - np.repeat(offsets, counts)
    members[cell_of[order], col] = order
    out = Geometry(
        starts=starts,
        stops=stops,
        cell_of=cell_of.astype(np.int64),
        cell_starts=np.ascontiguousarray(cells[:, :ndim]),
        cell_stops=np.ascontiguousarray(cells[:, ndim:]),
        members=members,
        member_count=counts.astype(np.int64),
    )
    for a in (out.starts, out.stops, out.cell_of, out.cell_starts, out.cell_stops, out.members):
        a.setflags(write=False)
    out.member_count.setflags(write=False)
    return out


@functools.lru_cache(maxsize=1 << 16)
def _box_bounds(
    key: tuple[tuple[int, ...], tuple[Placement, ...], tuple[int, ...]], pos: int
) -> tuple[tuple[int, int], ...]:
    """The box of mesh position `pos` of a layout (`Layout.key`): each refit's checks ask
    for every local tensor's box again, so it is kept as Python ints."""
    g = geometry(*key)
    return tuple((int(a), int(b)) for a, b in zip(g.starts[pos], g.stops[pos], strict=True))


class Layout:
    """A global tensor of `shape` placed on `mesh` by `placements` (one per mesh axis)."""

    __slots__ = ("_hash", "key", "mesh", "placements", "shape")

    mesh: Mesh
    placements: tuple[Placement, ...]
    shape: tuple[int, ...]

    def __init__(self, mesh: Mesh, placements: Sequence[Placement], shape: Sequence[int]) -> None:
        problems: list[str] = []
        if not isinstance(mesh, Mesh):
            raise XferError(f"Layout mesh must be an xfer.Mesh, got {type(mesh).__name__}")
        try:
            if any(isinstance(n, bool) or not isinstance(n, int | np.integer) for n in shape):
                raise TypeError
            shape_t = tuple(int(n) for n in shape)
        except TypeError:
            raise XferError(f"Layout shape must be a sequence of ints, got {shape!r}") from None
        if any(n < 0 for n in shape_t):
            problems.append(f"Layout shape {list(shape_t)} has a negative size")
        placements = tuple(placements)
        if len(placements) != mesh.ndim:
            problems.append(
                f"Layout on {mesh!r} needs {mesh.ndim} placements (one per axis "
                f"{mesh.axes}), got {len(placements)}: {placements}"
            )
        normalized: list[Placement] = []
        for axis, p in zip(mesh.axes, placements, strict=False):
            if type(p) is Shard:
                dim = p.dim + len(shape_t) if p.dim < 0 else p.dim
                if not 0 <= dim < len(shape_t):
                    problems.append(
                        f"placement Shard({p.dim}) on axis {axis!r} is out of range for a "
                        f"{len(shape_t)}-d tensor of shape {list(shape_t)}"
                    )
                    dim = 0
                normalized.append(Shard(dim))
            elif type(p) is Replicate:
                normalized.append(p)
            else:
                problems.append(
                    f"placement {p!r} on axis {axis!r} is not supported: use Shard(dim) or "
                    f"Replicate() (partial sums and strided shards must be resolved first)"
                )
        if problems:
            raise XferError(problems)
        self.mesh = mesh
        self.placements = tuple(normalized)
        self.shape = shape_t
        # what the boxes depend on (not which ranks): layouts sharing it share a Geometry
        self.key = (mesh.shape, self.placements, shape_t)
        self._hash = hash((mesh, self.placements, shape_t))

    # -- value semantics -------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Layout):
            return NotImplemented
        return (
            self._hash == other._hash
            and self.shape == other.shape
            and self.placements == other.placements
            and self.mesh == other.mesh
        )

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[Any, ...]:
        return (Layout, (self.mesh, self.placements, self.shape))

    def __repr__(self) -> str:
        pl = ", ".join(placement_str(p) for p in self.placements)
        return f"Layout({list(self.shape)} on {self.mesh!r} as ({pl}))"

    # -- geometry --------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def geometry(self) -> Geometry:
        return geometry(*self.key)

    def holds(self, rank: int) -> bool:
        """True when `rank` is in the mesh (its box may still be empty)."""
        return rank in self.mesh

    def bounds(self, rank: int) -> tuple[tuple[int, int], ...] | None:
        """Per dim ``(start, stop)`` of the box `rank` holds, or None outside the mesh."""
        pos = self.mesh.position(rank)
        if pos is None:
            return None
        return _box_bounds(self.key, pos)

    def box(self, rank: int) -> tuple[slice, ...]:
        """Slices of the global tensor that `rank` holds; zero-length slices outside the mesh."""
        b = self.bounds(rank)
        if b is None:
            return tuple(slice(0, 0) for _ in self.shape)
        return tuple(slice(a, z) for a, z in b)

    def local_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of the local shard of `rank` (all zeros outside the mesh)."""
        b = self.bounds(rank)
        if b is None:
            return tuple(0 for _ in self.shape)
        return tuple(z - a for a, z in b)
