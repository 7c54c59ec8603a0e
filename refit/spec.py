"""What each side says about its parameters, and the protocols the `Refitter` drives.

Both sides speak HuggingFace names and global shapes. A trainer says, per parameter, which
pipeline stage holds it and its `Layout` over the trainer's ranks ``0..T-1`` (a parameter the
trainer can only give whole from one rank has a one-rank mesh). An engine replica says, per
parameter, its `Layout` over the replica's ranks ``0..R-1`` when it can receive the shard
straight into its own storage (*bulk*), or ``None`` when the parameter must go through the
engine's own weight loading (*misc*), and which engine parameter it lands in.

Each side also says where its tensors live (`device`: ``"cpu"`` or ``"cuda"``), which picks
the backend (gloo moves CPU tensors, NCCL CUDA tensors).

`TrainerSide` and `EngineSide` are driver-side handles to groups of rank processes; every call
that involves communication starts the work and returns a `Pending`, so the `Refitter` can run
both sides at once. The rank processes themselves run `refit.rank.RefitRank`.

Every record here has a plain JSON form (`to_json` / ``from_json``, built on `xfer.wire`):
descriptions and setups travel between processes as JSON, never as pickles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

import torch

from xfer import Layout
from xfer.wire import (
    WireError,
    as_int,
    as_ints,
    as_str,
    dtype_from_name,
    dtype_name,
    layout_from_json,
    layout_to_json,
)

__all__ = [
    "Axis",
    "DestParam",
    "EngineSide",
    "EngineSpec",
    "EngineStatus",
    "Kind",
    "Pending",
    "SourceParam",
    "TrainerSide",
    "TrainerSpec",
    "device_kind",
]

DEVICES = ("cpu", "cuda")


def device_kind(device: torch.device | str) -> str:
    """``"cuda"`` or ``"cpu"``: the device type a side reports."""
    kind = torch.device(device).type
    if kind not in DEVICES:
        raise ValueError(f"tensors on {kind} cannot be refit (cpu or cuda only)")
    return kind


def _obj(x: Any, what: str) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise WireError(f"{what}: expected an object, got {type(x).__name__}")
    return x


def _device(x: Any, what: str) -> str:
    d = as_str(x, what)
    if d not in DEVICES:
        raise WireError(f"{what}: {d!r} is not one of {DEVICES}")
    return d


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

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "stage": self.stage,
            "layout": layout_to_json(self.layout),
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, x: Any) -> SourceParam:
        d = _obj(x, "trainer parameter")
        name = as_str(d.get("name"), "parameter name")
        return cls(
            name,
            as_ints(d.get("shape"), f"{name}.shape", lo=0),
            dtype_from_name(d.get("dtype"), f"{name}.dtype"),
            as_int(d.get("stage"), f"{name}.stage", lo=0),
            layout_from_json(d.get("layout"), f"{name}.layout"),
            as_str(d.get("reason", ""), f"{name}.reason"),
        )


@dataclass(frozen=True)
class TrainerSpec:
    world: int
    stage_ranks: tuple[tuple[int, ...], ...]  # trainer ranks of each pipeline stage
    params: tuple[SourceParam, ...]
    device: str = "cpu"  # where the trainer's shards live: "cpu" or "cuda"

    @property
    def stages(self) -> int:
        return len(self.stage_ranks)

    def to_json(self) -> dict[str, Any]:
        return {
            "world": self.world,
            "stage_ranks": [list(r) for r in self.stage_ranks],
            "params": [p.to_json() for p in self.params],
            "device": self.device,
        }

    @classmethod
    def from_json(cls, x: Any) -> TrainerSpec:
        d = _obj(x, "trainer description")
        stages = d.get("stage_ranks")
        params = d.get("params")
        if not isinstance(stages, list) or not isinstance(params, list):
            raise WireError("trainer description: stage_ranks and params must be lists")
        return cls(
            as_int(d.get("world"), "trainer world", lo=1),
            tuple(as_ints(r, "stage ranks", lo=0) for r in stages),
            tuple(SourceParam.from_json(p) for p in params),
            _device(d.get("device", "cpu"), "trainer device"),
        )


@dataclass(frozen=True)
class DestParam:
    """Where one HF-named parameter lands in an engine replica."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    target: str  # the engine parameter it is written into (for reports and errors)
    layout: Layout | None  # over the replica's ranks 0..R-1; None: misc (engine loads it)
    reason: str = ""  # why it is misc, when it is

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "target": self.target,
            "layout": None if self.layout is None else layout_to_json(self.layout),
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, x: Any) -> DestParam:
        d = _obj(x, "engine parameter")
        name = as_str(d.get("name"), "parameter name")
        lay = d.get("layout")
        return cls(
            name,
            as_ints(d.get("shape"), f"{name}.shape", lo=0),
            dtype_from_name(d.get("dtype"), f"{name}.dtype"),
            as_str(d.get("target"), f"{name}.target"),
            None if lay is None else layout_from_json(lay, f"{name}.layout"),
            as_str(d.get("reason", ""), f"{name}.reason"),
        )


@dataclass(frozen=True)
class EngineSpec:
    world: int  # ranks of one replica
    params: tuple[DestParam, ...]
    ignored: tuple[str, ...] = ()  # prefixes of HF names it drops on load (e.g. MTP layers)
    device: str = "cpu"  # where the engine's weights live: "cpu" or "cuda"

    def to_json(self) -> dict[str, Any]:
        return {
            "world": self.world,
            "params": [p.to_json() for p in self.params],
            "ignored": list(self.ignored),
            "device": self.device,
        }

    @classmethod
    def from_json(cls, x: Any) -> EngineSpec:
        d = _obj(x, "engine description")
        params, ignored = d.get("params"), d.get("ignored", [])
        if not isinstance(params, list) or not isinstance(ignored, list):
            raise WireError("engine description: params and ignored must be lists")
        return cls(
            as_int(d.get("world"), "engine world", lo=1),
            tuple(DestParam.from_json(p) for p in params),
            tuple(as_str(i, "ignored prefix") for i in ignored),
            _device(d.get("device", "cpu"), "engine device"),
        )


@dataclass
class EngineStatus:
    """What one engine rank's weights are.

    `version` is the last refit that completed on every rank (0: the checkpoint it was
    loaded with); `attempted` the last refit started, or the trainer's current refit when a
    replacement engine joins; `holds` the refit whose weights this rank runs exactly (None:
    a mix of two). The rank is *stale* unless it holds exactly the last completed refit and
    that is the last one attempted: after a failed refit it may have rolled back
    (``holds == version``), be partly new (``holds is None``), or have installed the new
    weights that the other ranks did not agree on (``holds == attempted``)."""

    version: int = 0
    attempted: int = 0
    holds: int | None = 0
    last_error: str = ""
    seconds: float = 0.0

    @property
    def stale(self) -> bool:
        return self.attempted != self.version or self.holds != self.version

    def describe(self) -> str:
        if not self.stale:
            return f"fresh: the weights of refit {self.version}"
        if self.holds is None:
            held = f"partly the weights of refit {self.attempted}"
        elif self.holds == self.attempted:
            held = f"the weights of refit {self.attempted}, which did not complete on every rank"
        else:
            held = f"the weights of refit {self.holds}"
        why = f" ({self.last_error})" if self.last_error else ""
        return f"stale: holds {held}; refit {self.attempted} is the trainer's current{why}"

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "attempted": self.attempted,
            "holds": self.holds,
            "last_error": self.last_error,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, x: Any) -> EngineStatus:
        return cls(
            int(x["version"]),
            int(x["attempted"]),
            None if x["holds"] is None else int(x["holds"]),
            str(x["last_error"]),
            float(x["seconds"]),
        )


class Pending(Protocol):
    """Work started on a group of rank processes."""

    def wait(self, timeout: float | None = None) -> list[Any]: ...


@runtime_checkable
class TrainerSide(Protocol):
    """A group of trainer ranks (e.g. Ray actors), seen from the driver."""

    def describe(self) -> TrainerSpec: ...

    def connect(self, setup: bytes) -> Pending:
        """Every rank joins the refit generation `setup` describes (a `refit.setup.RankSetup`
        as JSON, for rank 0; each rank sets its own refit rank)."""
        ...

    def step(self, version: int, path: str | None = None) -> Pending:
        """Every rank sends its part of refit number `version` (`path` overrides the
        configured xfer path for this refit)."""
        ...


@runtime_checkable
class EngineSide(Protocol):
    """One engine replica (all its ranks), seen from the driver."""

    def describe(self) -> EngineSpec: ...

    def connect(self, setup: bytes, installed: int = 0) -> Pending:
        """Every rank joins the refit generation `setup` describes (a `RankSetup` as JSON,
        for the replica's first rank). `installed` is the last refit the trainer completed:
        an engine that does not hold it is stale until a refit completes."""
        ...

    def step(self, version: int, path: str | None = None) -> Pending:
        """Every rank receives and installs refit number `version`, and the engine drops
        every cache computed with its old weights (see `refit.rpc.invalidate_caches`)."""
        ...

    def status(self) -> list[EngineStatus]:
        """Each rank's `EngineStatus`."""
        ...


def param_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n
