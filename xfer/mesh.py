"""`Mesh`: an n-d array of communicator ranks with named axes.

A mesh is a value: two meshes with the same rank array and axis names are equal and hash
alike, so layouts built on them can key caches and compare across ranks after pickling. The
rank array is stored read-only; `coords` and `positions` are vectorized for planning over
thousands of ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from xfer.errors import XferError


class Mesh:
    """Ranks arranged on named axes, e.g. ``Mesh([[0, 1], [2, 3]], ("dp", "tp"))``.

    Ranks are ranks of the communicator the reshard runs on (not necessarily global ranks).
    Axis names are plain strings (a `StrEnum` member works too).
    """

    __slots__ = ("_axes", "_flat", "_hash", "_max", "_pos", "_ranks", "_shape")

    def __init__(self, ranks: Any, axes: Sequence[str]) -> None:
        raw = np.array(ranks)
        if raw.size and raw.dtype.kind not in "iu":
            raise XferError(
                f"Mesh ranks must be integers, got {raw.dtype} values {raw.reshape(-1)[:8].tolist()}"
            )
        arr = raw.astype(np.int64)
        axes = tuple(str(a) for a in axes)
        problems = []
        if arr.ndim == 0:
            problems.append(f"Mesh ranks must have at least one axis, got the scalar {ranks!r}")
        elif arr.ndim != len(axes):
            problems.append(
                f"Mesh ranks have {arr.ndim} axes {tuple(arr.shape)} but {len(axes)} names {axes}"
            )
        if len(set(axes)) != len(axes):
            problems.append(f"Mesh axis names repeat: {axes}")
        if arr.size == 0:
            problems.append(f"Mesh has no ranks (shape {tuple(arr.shape)})")
        elif arr.min() < 0:
            problems.append(f"Mesh ranks must be >= 0, got {sorted(set(arr[arr < 0].tolist()))}")
        flat = arr.reshape(-1)
        if len(np.unique(flat)) != flat.size:
            vals, counts = np.unique(flat, return_counts=True)
            problems.append(f"Mesh ranks repeat: {vals[counts > 1].tolist()}")
        if problems:
            raise XferError(problems)
        arr.setflags(write=False)
        self._ranks = arr
        self._axes = axes
        self._flat = tuple(int(r) for r in flat)
        self._shape = tuple(int(n) for n in arr.shape)
        self._max = max(self._flat)
        self._hash = hash((self._shape, self._flat, axes))
        self._pos: dict[int, int] | None = None

    # -- value semantics -------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mesh):
            return NotImplemented
        return (
            self._hash == other._hash
            and self._axes == other._axes
            and self._ranks.shape == other._ranks.shape
            and self._flat == other._flat
        )

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[Any, ...]:
        return (Mesh, (self._ranks.tolist(), self._axes))

    def __repr__(self) -> str:
        dims = ", ".join(f"{a}={n}" for a, n in zip(self._axes, self.shape, strict=True))
        lo, hi = min(self._flat), max(self._flat)
        if self.is_interval():
            where = f"ranks {lo}..{hi}"
        elif len(self._flat) <= 8:
            where = f"ranks {list(self._flat)}"
        else:
            where = f"{len(self._flat)} ranks in {lo}..{hi}"
        return f"Mesh({dims}; {where})"

    # -- shape -----------------------------------------------------------------------------
    @property
    def ranks(self) -> np.ndarray:
        """The read-only n-d array of ranks."""
        return self._ranks

    @property
    def axes(self) -> tuple[str, ...]:
        return self._axes

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def max_rank(self) -> int:
        return self._max

    @property
    def ndim(self) -> int:
        return self._ranks.ndim

    @property
    def size(self) -> int:
        return len(self._flat)

    @property
    def flat(self) -> tuple[int, ...]:
        """Ranks in mesh (row-major) order."""
        return self._flat

    def axis_index(self, axis: str) -> int:
        try:
            return self._axes.index(str(axis))
        except ValueError:
            raise XferError(f"{self!r} has no axis {axis!r}; its axes are {self._axes}") from None

    # -- membership ------------------------------------------------------------------------
    def __contains__(self, rank: object) -> bool:
        return rank in self._position_map()

    def position(self, rank: int) -> int | None:
        """Row-major index of `rank` in the mesh, or None if it is not a member."""
        return self._position_map().get(int(rank))

    def coord(self, rank: int) -> tuple[int, ...] | None:
        pos = self.position(rank)
        if pos is None:
            return None
        return tuple(int(c) for c in np.unravel_index(pos, self.shape))

    def is_interval(self) -> bool:
        """True when the ranks, in mesh order, are consecutive integers."""
        return self._flat == tuple(range(self._flat[0], self._flat[0] + len(self._flat)))

    def _position_map(self) -> dict[int, int]:
        # Built on first use; a mesh is immutable so the map never goes stale.
        if self._pos is None:
            self._pos = {r: i for i, r in enumerate(self._flat)}
        return self._pos
