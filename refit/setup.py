"""`RankSetup` and `RankOptions`: what a rank needs to join a refit generation.

The driver hands every rank a `RankSetup` over its trusted control channel, as JSON (never a
pickle): where the refit's store is, the store prefix of this generation, the per-refit token
that authenticates every record in the store, both sides' descriptions, the number of engine
replicas, this rank's refit rank and the options. `from_json` checks every field's type and
range and raises `WireError` naming the field; every rank computes the same `RefitPlan` from
the record (`RankSetup.plan`, pure).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, cast

from refit.planner import RefitPlan, plan_refit
from refit.spec import EngineSpec, TrainerSpec
from xfer import DEFAULT_BUCKET_BYTES
from xfer.api import PATHS, Path
from xfer.wire import WireError, as_int, as_str, dumps, loads

__all__ = ["BASELINES", "INSTALLS", "RankOptions", "RankSetup"]


@dataclass(frozen=True)
class RankOptions:
    path: Path = "auto"
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    backend: str = "gloo"  # "gloo" (CPU tensors) or "nccl" (CUDA tensors)
    timeout_s: float = 600.0
    verify: bool = False  # checksum every received tensor (see `xfer.checksum`)
    strict: bool = False  # hold every rank to NCCL's rules on any backend (`xfer.strict`)
    # engines: "live" writes bulk into the running weights where nothing processes them (no
    # second copy, no rollback), "staged" into checkpoint-format copies (rollback possible);
    # "auto": live on GPUs, staged where the platform repacks weights (CPU)
    install: str = "auto"
    # sparse deltas (`xfer.delta`): the first refit of every communicator generation is
    # dense, then each refit sends only what changed since the previous one; `full_every`
    # forces a dense refit every that many refits (0: never); baselines live in host memory
    # ("cpu") or on the rank's GPU ("device")
    delta: bool = False
    full_every: int = 0
    baselines: str = "cpu"
    # engine replicas forward to each other (`xfer.plan`): None picks by rounds saved,
    # False never, True always, an int that many chains per replica class
    relay: bool | int | None = None
    # a chunk of at least this many bytes is a message of its own (`xfer.plan`): None,
    # the bucket / 64; 0 never
    part_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "bucket_bytes": self.bucket_bytes,
            "backend": self.backend,
            "timeout_s": self.timeout_s,
            "verify": self.verify,
            "strict": self.strict,
            "install": self.install,
            "delta": self.delta,
            "full_every": self.full_every,
            "baselines": self.baselines,
            "relay": self.relay,
            "part_bytes": self.part_bytes,
        }

    @classmethod
    def from_json(cls, x: Any) -> RankOptions:
        if not isinstance(x, dict):
            raise WireError("options: expected an object")
        path = as_str(x.get("path"), "path")
        backend = as_str(x.get("backend"), "backend")
        timeout = x.get("timeout_s")
        if path not in PATHS or backend not in ("gloo", "nccl"):
            raise WireError(f"options: path {path!r} or backend {backend!r} unknown")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise WireError(f"options: timeout_s {timeout!r} is not a positive number")
        return cls(
            cast(Path, path),  # one of PATHS: checked above
            as_int(x.get("bucket_bytes"), "bucket_bytes", lo=1),
            backend,
            float(timeout),
            bool(x.get("verify")),
            bool(x.get("strict")),
            _install(x.get("install", "auto")),
            bool(x.get("delta", False)),
            as_int(x.get("full_every", 0), "full_every", lo=0),
            _baselines(x.get("baselines", "cpu")),
            _relay(x.get("relay")),
            _part_bytes(x.get("part_bytes")),
        )


INSTALLS = ("auto", "live", "staged")
BASELINES = ("cpu", "device")


def _relay(x: Any) -> bool | int | None:
    if x is None or isinstance(x, bool):
        return x
    return as_int(x, "relay", lo=1)


def _part_bytes(x: Any) -> int | None:
    return None if x is None else as_int(x, "part_bytes", lo=0)


def _baselines(x: Any) -> str:
    where = as_str(x, "baselines")
    if where not in BASELINES:
        raise WireError(f"options: baselines {where!r} is not one of {BASELINES}")
    return where


def _install(x: Any) -> str:
    mode = as_str(x, "install")
    if mode not in INSTALLS:
        raise WireError(f"options: install {mode!r} is not one of {INSTALLS}")
    return mode


@dataclass(frozen=True)
class RankSetup:
    """Everything a rank needs to join a refit generation; crosses processes as JSON."""

    host: str
    port: int
    prefix: str  # store keys of this generation
    token: str  # hex: authenticates every record in the store (`refit.watch`)
    rank: int  # refit rank
    trainer: TrainerSpec
    engine: EngineSpec  # one replica's description (all replicas describe the same)
    replicas: int
    options: RankOptions = RankOptions()

    def plan(self) -> RefitPlan:
        return plan_refit(self.trainer, [self.engine] * self.replicas)

    def for_rank(self, rank: int) -> RankSetup:
        return replace(self, rank=rank)

    def to_json(self) -> bytes:
        return dumps(
            {
                "host": self.host,
                "port": self.port,
                "prefix": self.prefix,
                "token": self.token,
                "rank": self.rank,
                "trainer": self.trainer.to_json(),
                "engine": self.engine.to_json(),
                "replicas": self.replicas,
                "options": self.options.to_json(),
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> RankSetup:
        x = loads(raw, what="refit setup")
        if not isinstance(x, dict):
            raise WireError("refit setup: expected an object")
        token = as_str(x.get("token"), "token")
        try:
            bytes.fromhex(token)
        except ValueError:
            raise WireError("refit setup: token is not hex") from None
        return cls(
            as_str(x.get("host"), "host"),
            as_int(x.get("port"), "port", lo=0),
            as_str(x.get("prefix"), "prefix"),
            token,
            as_int(x.get("rank"), "rank", lo=0),
            TrainerSpec.from_json(x.get("trainer")),
            EngineSpec.from_json(x.get("engine")),
            as_int(x.get("replicas"), "replicas", lo=1),
            RankOptions.from_json(x.get("options")),
        )
