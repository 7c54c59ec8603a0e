"""The records the harness's runs report: a scenario's steps (`ScenarioReport`), a Megatron
scenario's layouts (`MegatronReport`), a fault campaign's cases (`harness.fault_report`).

Each is a frozen dataclass of plain values, written as JSON by the run (`write`) and read
back by whoever checks it (`read`), field for field: a renamed or missing field fails at
`read` with its name instead of a `KeyError` somewhere in a test.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "LayoutReport",
    "MegatronReport",
    "PlanFacts",
    "ScenarioReport",
    "StepReport",
    "decode",
    "read",
    "write",
]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class PlanFacts:
    """A refit plan's shape (its summary is prose)."""

    stages: int
    trainer_world: int
    replicas: int
    replica_world: int
    bulk: int
    misc: int
    misc_bytes_per_engine_rank: int

    @classmethod
    def of(cls, plan: Any) -> PlanFacts:
        return cls(
            stages=plan.stages,
            trainer_world=plan.trainer_world,
            replicas=plan.replicas,
            replica_world=plan.replica_world,
            bulk=plan.bulk,
            misc=len(plan.misc),
            misc_bytes_per_engine_rank=sum(e.nbytes for e in plan.misc),
        )


@dataclasses.dataclass(frozen=True)
class StepReport:
    """One training step's refits (p2p, then golden) checked against each other and HF.

    `received_differs` / `state_differs`: per engine rank, the tensors whose bytes differ
    between the p2p and the golden refit (what the engine received; its state after the
    install). `tokens_equal`: per replica and prompt, whether generation equals HF's on the
    same weights. The Megatron fields are set only for a Megatron trainer."""

    step: int
    p2p_seconds: float
    golden_seconds: float
    delta: bool
    wire_bytes: int
    baseline_bytes: int
    peak_staging_bytes: int
    engine_staging_bytes: int
    engine_extra_bytes: int
    trainer_extra_bytes: int
    bulk_bytes: int
    misc_bytes: int
    trainer_sent_bytes: int
    relayed_bytes: int
    phases: dict[str, float]
    received_differs: list[list[str]]
    state_differs: list[list[str]]
    captured_tensors: int
    tokens_equal: list[list[bool]]
    max_logprob_diff: float
    hf_changed: bool  # HF's own output moved since the previous step: the refit had work
    export_differs: list[str] | None = None  # HF tensors the Megatron export got wrong
    logits_diff: float | None = None  # Megatron's forward against HF's
    logits_max: float | None = None

    def ok(self, atol: float) -> bool:
        return (
            not any(self.received_differs)
            and not any(self.state_differs)
            and all(all(t) for t in self.tokens_equal)
            and self.max_logprob_diff <= atol
            and self.hf_changed
        )


@dataclasses.dataclass(frozen=True)
class ScenarioReport:
    """`python -m harness.scenario` with a torch trainer."""

    args: dict[str, Any]
    plan: str
    plan_facts: PlanFacts
    bulk_fraction: float
    misc: list[tuple[str, str]]  # (name, why it is not bulk)
    prepare_seconds: float
    initial_tokens_equal: list[list[bool]]
    steps: list[StepReport]
    ok: bool
    returncode: int | None = None  # the process's exit status, set by whoever ran it


@dataclasses.dataclass
class LayoutReport:
    """One Megatron layout refitted into the scenario's engine (filled in as it runs: a
    layout that fails part way keeps what it measured, and `error`)."""

    layout: str
    parallel: str
    world: int
    launch_seconds: float = 0.0
    init_logits_diff: float | None = None  # Megatron's own initial weights against HF
    init_logits_max: float | None = None
    metadata_spec_equal: bool | None = None  # the metadata model's spec (default vocab only)
    plan: str = ""
    plan_facts: PlanFacts | None = None
    bulk_fraction: float = 0.0
    misc: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    steps: list[StepReport] = dataclasses.field(default_factory=list)
    error: str | None = None
    ok: bool = False
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class MegatronReport:
    """`python -m harness.scenario --trainer megatron`: every layout in turn."""

    args: dict[str, Any]
    initial_tokens_equal: list[list[bool]]
    layouts: list[LayoutReport]
    ok: bool
    returncode: int | None = None


def write(record: Any, path: str | Path | None) -> str:
    """`record` as JSON (to `path` when given); returns the text."""
    text = json.dumps(dataclasses.asdict(record), indent=1, default=str)
    if path:
        Path(path).write_text(text)
    return text


def read(cls: type[T], path: str | Path) -> T:
    return decode(cls, json.loads(Path(path).read_text()))


def decode(tp: Any, value: Any) -> Any:
    """`value` (parsed JSON) as type `tp`: dataclasses field by field (an unknown or missing
    field is an error naming it), lists, tuples, dicts, optionals and plain values."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return decode(inner, value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"{tp.__name__}: expected an object, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        if unknown := sorted(set(value) - names):
            raise TypeError(f"{tp.__name__}: unknown fields {unknown}")
        try:
            return tp(**{k: decode(hints[k], v) for k, v in value.items()})  # type: ignore[operator]
        except TypeError as e:
            raise TypeError(f"{tp.__name__}: {e}") from None
    if origin is list:
        (item,) = typing.get_args(tp)
        return [decode(item, v) for v in value]
    if origin is tuple:
        items = typing.get_args(tp)
        if len(items) == 2 and items[1] is Ellipsis:
            return tuple(decode(items[0], v) for v in value)
        return tuple(decode(t, v) for t, v in zip(items, value, strict=True))
    if origin is dict:
        _, item = typing.get_args(tp)
        return {k: decode(item, v) for k, v in value.items()}
    if tp is float and isinstance(value, int):
        return float(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise TypeError(f"expected {tp.__name__}, got {value!r}")
    return value
