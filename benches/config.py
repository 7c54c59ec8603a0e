"""Benchmark configurations: `benches/configs/<name>.yaml`, checked strictly.

Sections: ``model`` (the HF config fields of the architecture, passed through as they are),
``precision`` (``bf16`` or ``fp8``: blockwise FP8 weights with float32 scales), ``trainer``
(Megatron parallelism: tp, pp, vpp, dp, ep, etp), ``engine`` (vLLM: tp, replicas,
expert_parallel), ``refit`` (bucket_mib, max_extra_gib), ``cluster`` (the fields of
`benches.simulate.Cluster`; link speeds in GB/s per GPU per direction), ``local`` (the
scaled-down copy run on this machine: model overrides, trainer, engine, refit) and optionally
``published`` (figures to compare with: what, seconds).

The bucket. ``bucket_mib`` is the most a rank sends (or receives) per round. With
``max_extra_gib``, the memory an engine rank may add for a refit, the bucket is derived from
the plan: an engine rank holds two receive buffers of one round and every misc tensor whole,
so bucket = (budget - misc bytes) / 2, capped at ``bucket_mib`` when that is given too.

Every key is checked at every level (except inside ``model``, an HF config): an unknown key
is an error naming the section and the keys it knows, so a typo never falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from backends.parallel import Parallel
from benches.simulate import Cluster
from refit.errors import RefitError
from refit.refitter import MIN_BUDGET_BUCKET, budget_bucket
from xfer import DEFAULT_BUCKET_BYTES

__all__ = ["BenchConfig", "ConfigError", "Side", "load"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}

TOP = ("model", "precision", "trainer", "engine", "refit", "cluster", "local", "published")
REQUIRED = ("model", "trainer", "engine", "cluster", "local")
TRAINER = ("tp", "pp", "vpp", "dp", "ep", "etp")
ENGINE = ("tp", "replicas", "expert_parallel")
REFIT = ("bucket_mib", "max_extra_gib")
LOCAL = ("model", "trainer", "engine", "refit")
PUBLISHED = ("what", "seconds")
CLUSTER = tuple(f.name for f in dataclasses.fields(Cluster))
CLUSTER_REQUIRED = ("gpus_per_node", "nic_GBps", "nvlink_GBps")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Side:
    """One layout of the two sides: Megatron trainer, vLLM engine replicas, refit options."""

    model: dict[str, Any]
    trainer: Parallel
    engine_tp: int
    replicas: int
    expert_parallel: bool
    bucket_cap: int | None  # bucket_mib, in bytes
    max_extra_bytes: int | None  # max_extra_gib per engine GPU, in bytes

    @property
    def world(self) -> int:
        return self.trainer.world + self.engine_tp * self.replicas

    def bucket_bytes(self, misc_bytes: int) -> int:
        """The bucket for a refit whose engine ranks hold `misc_bytes` of misc tensors: the
        Refitter's own `refit.refitter.budget_bucket` of the budget, at most ``bucket_mib``."""
        if self.max_extra_bytes is None:
            return self.bucket_cap or DEFAULT_BUCKET_BYTES
        cap = self.max_extra_bytes if self.bucket_cap is None else self.bucket_cap
        try:
            return budget_bucket(self.max_extra_bytes, misc_bytes, cap)
        except RefitError as e:
            raise ConfigError(
                f"max_extra_gib {self.max_extra_bytes / 2**30:g} GiB leaves a bucket too small "
                f"after {misc_bytes / 2**20:.1f} MiB of misc tensors ({e}); allow at least "
                f"{(misc_bytes + 2 * MIN_BUDGET_BUCKET) / 2**30:.3f} GiB"
            ) from e


@dataclass(frozen=True)
class BenchConfig:
    name: str
    precision: str
    full: Side
    local: Side
    cluster: Cluster
    published: list[dict[str, Any]]


class _Checker:
    """Collects every problem of one file, to raise them together."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[str] = []

    def section(self, where: str, x: Any, known: tuple[str, ...], required: tuple[str, ...] = ()):
        if not isinstance(x, dict):
            self.problems.append(f"{where}: expected a mapping, got {type(x).__name__}")
            return {}
        unknown = sorted(str(k) for k in x if k not in known)
        if unknown:
            self.problems.append(
                f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {unknown}; known keys: "
                f"{', '.join(known)}"
            )
        missing = [k for k in required if k not in x]
        if missing:
            self.problems.append(f"{where}: missing {missing}")
        return {k: v for k, v in x.items() if k in known}

    def number(self, where: str, x: Any, *, integer: bool = False, positive: bool = True) -> Any:
        ok = isinstance(x, int) if integer else isinstance(x, int | float)
        if isinstance(x, bool) or not ok or (positive and x <= 0):
            kind = "an integer" if integer else "a number"
            self.problems.append(f"{where}: expected {kind}{' > 0' if positive else ''}, got {x!r}")
            return 1
        return x

    def raise_if_any(self) -> None:
        if self.problems:
            if len(self.problems) == 1:
                raise ConfigError(f"{self.file}: {self.problems[0]}")
            lines = "".join(f"\n  - {p}" for p in self.problems)
            raise ConfigError(f"{self.file}: {len(self.problems)} problems:{lines}")


@dataclass(frozen=True)
class _SideKeys:
    """One side's checked sections (trainer, engine, refit), before they become a `Side`."""

    where: str  # the key prefix of its sections: "" at full scale, "local."
    trainer: dict[str, Any]
    engine: dict[str, Any]
    refit: dict[str, Any]


def _check_side(chk: _Checker, where: str, trainer: Any, engine: Any, refit: Any) -> _SideKeys:
    t = chk.section(f"{where}trainer", trainer, TRAINER)
    e = chk.section(f"{where}engine", engine, ENGINE, ("tp",))
    r = chk.section(f"{where}refit", refit, REFIT)
    for k, v in t.items():
        chk.number(f"{where}trainer.{k}", v, integer=True)
    for k in ("tp", "replicas"):
        if k in e:
            chk.number(f"{where}engine.{k}", e[k], integer=True)
    if not isinstance(e.get("expert_parallel", False), bool):
        chk.problems.append(f"{where}engine.expert_parallel: expected true or false")
    for k, v in r.items():
        chk.number(f"{where}refit.{k}", v)
    return _SideKeys(where, t, e, r)


def _side(chk: _Checker, keys: _SideKeys, model: dict[str, Any]) -> Side:
    t, e, r = keys.trainer, keys.engine, keys.refit
    try:
        par = Parallel(**t)
    except ValueError as err:  # RefitError: every violated factor
        raise ConfigError(f"{chk.file}: {keys.where}trainer: {err}") from None
    return Side(
        model=model,
        trainer=par,
        engine_tp=int(e["tp"]),
        replicas=int(e.get("replicas", 1)),
        expert_parallel=bool(e.get("expert_parallel", False)),
        bucket_cap=int(float(r["bucket_mib"]) * 2**20) if "bucket_mib" in r else None,
        max_extra_bytes=int(float(r["max_extra_gib"]) * 2**30) if "max_extra_gib" in r else None,
    )


def _cluster(chk: _Checker, c: Any, default_name: str) -> dict[str, Any]:
    """The checked fields of `Cluster`."""
    c = chk.section("cluster", c, CLUSTER, CLUSTER_REQUIRED)
    values: dict[str, Any] = {"name": str(c.get("name", default_name))}
    for f in dataclasses.fields(Cluster):
        if f.name == "name" or f.name not in c:
            continue
        v = c[f.name]
        if f.name == "copy_overlaps":
            if not isinstance(v, bool):
                chk.problems.append("cluster.copy_overlaps: expected true or false")
            values[f.name] = bool(v)
        elif f.name == "gpus_per_node":
            values[f.name] = chk.number("cluster.gpus_per_node", v, integer=True)
        else:
            values[f.name] = float(
                chk.number(f"cluster.{f.name}", v, positive="latency" not in f.name)
            )
    return values


def _published(chk: _Checker, published: Any) -> list[dict[str, Any]]:
    if not isinstance(published, list):
        chk.problems.append("published: expected a list")
        return []
    for i, p in enumerate(published):
        p = chk.section(f"published[{i}]", p, PUBLISHED, PUBLISHED)
        s = p.get("seconds")
        if "seconds" in p and not (
            isinstance(s, list) and len(s) == 2 and all(isinstance(x, int | float) for x in s)
        ):
            chk.problems.append(f"published[{i}].seconds: expected [low, high], got {s!r}")
    return list(published)


def _path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    path = CONFIG_DIR / (name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml")
    if not path.exists():
        known = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"no config {name_or_path!r}; known: {known}")
    return path


def load(name_or_path: str, *, precision: str | None = None) -> BenchConfig:
    """Load ``benches/configs/<name>`` (``.yaml`` optional) or a path; one `ConfigError`
    lists every problem of the file."""
    path = _path(name_or_path)
    chk = _Checker(path.name)
    raw = chk.section("top level", yaml.safe_load(path.read_text()), TOP, REQUIRED)
    chk.raise_if_any()
    prec = precision or raw.get("precision", "bf16")
    if prec not in ("bf16", "fp8"):
        chk.problems.append(f"precision: expected bf16 or fp8, got {prec!r}")
    model, local = raw["model"], chk.section("local", raw["local"], LOCAL, ("trainer", "engine"))
    local_model = local.get("model", {})
    for where, x in (("model", model), ("local.model", local_model)):
        if not isinstance(x, dict):
            chk.problems.append(f"{where}: expected a mapping (HF config fields)")
    full_keys = _check_side(chk, "", raw["trainer"], raw["engine"], raw.get("refit", {}))
    local_keys = _check_side(
        chk, "local.", local.get("trainer"), local.get("engine"), local.get("refit", {})
    )
    cluster = _cluster(chk, raw["cluster"], path.stem)
    published = _published(chk, raw.get("published", []))
    chk.raise_if_any()
    model = dict(model)
    if prec == "fp8":
        model["quantization_config"] = dict(FP8)
    return BenchConfig(
        name=path.stem,
        precision=prec,
        full=_side(chk, full_keys, model),
        local=_side(chk, local_keys, {**model, **local_model}),
        cluster=Cluster(**cluster),
        published=published,
    )
