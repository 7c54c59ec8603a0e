"""What each side says about its parameters, and the protocols the `Refitter` drives.

Both sides speak HuggingFace names and global shapes. A trainer says, per parameter, which
pipeline stage holds it and its `Layout` over the trainer's ranks ``0..T-1`` (a parameter the
trainer can only give whole from one rank has a one-rank mesh). An engine replica says, per
parameter, its `Layout` over the replica's ranks ``0..R-1`` when it can receive the shard
straight into its own storage (*bulk*), or ``None`` when the parameter must go through the
engine's own weight loading (*misc*), and which engine parameter it lands in.

`TrainerSide` and `EngineSide` are driver-side handles to groups of rank processes; every call
that involves communication starts the work and returns a `Pending`, so the `Refitter` can run
both sides at once. The rank processes themselves run `refit.rank.RefitRank`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

import torch

from xfer import Layout

__all__ = [
    "Axis",
    "DestParam",
    "EngineSide",
    "EngineSpec",
    "Kind",
    "Pending",
    "SourceParam",
    "TrainerSide",
    "TrainerSpec",
]


class Axis(StrEnum):
    """Mesh axis names (an axis is a mesh axis; a dim is a tensor dim)."""

    DP = "dp"
    TP = "tp"
    PP = "pp"
    EP = "ep"
    ETP = "etp"
    EDP = "edp"
    REPLICA = "replica"


class Kind(StrEnum):
    BULK = "bulk"
    MISC = "misc"


@dataclass(frozen=True)
class SourceParam:
    """One HF-named parameter as the trainer holds it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    stage: int
    layout: Layout  # over trainer ranks 0..T-1
    # non-empty: the trainer's shards are not a `Layout` (why); `layout` is then a one-rank
    # mesh on the stage's first rank, which holds the tensor whole, and it is sent as misc
    reason: str = ""


@dataclass(frozen=True)
class TrainerSpec:
    world: int
    stage_ranks: tuple[tuple[int, ...], ...]  # trainer ranks of each pipeline stage
    params: tuple[SourceParam, ...]

    @property
    def stages(self) -> int:
        return len(self.stage_ranks)


@dataclass(frozen=True)
class DestParam:
    """Where one HF-named parameter lands in an engine replica."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    target: str  # the engine parameter it is written into (for reports and errors)
    layout: Layout | None  # over the replica's ranks 0..R-1; None: misc (engine loads it)
    reason: str = ""  # why it is misc, when it is


@dataclass(frozen=True)
class EngineSpec:
    world: int  # ranks of one replica
    params: tuple[DestParam, ...]
    ignored: tuple[str, ...] = ()  # prefixes of HF names it drops on load (e.g. MTP layers)


class Pending(Protocol):
    """Work started on a group of rank processes."""

    def wait(self, timeout: float | None = None) -> list[Any]: ...


@runtime_checkable
class TrainerSide(Protocol):
    """A group of trainer ranks (e.g. Ray actors), seen from the driver."""

    def describe(self) -> TrainerSpec: ...

    def connect(self, setup: bytes) -> Pending:
        """Every rank joins the refit groups described by `setup` (pickled RankSetup)."""
        ...

    def step(self, version: int, path: str | None = None) -> Pending:
        """Every rank sends its part of refit number `version` (`path` overrides the
        configured xfer path for this refit)."""
        ...


@runtime_checkable
class EngineSide(Protocol):
    """One engine replica (all its ranks), seen from the driver."""

    def describe(self) -> EngineSpec: ...

    def connect(self, setup: bytes) -> Pending: ...

    def step(self, version: int, path: str | None = None) -> Pending:
        """Every rank receives and installs refit number `version`."""
        ...


def param_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n
