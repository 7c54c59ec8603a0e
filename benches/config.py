"""Benchmark configurations: `benches/configs/<name>.yaml`.

Sections: ``model`` (the HF config fields of the architecture), ``precision`` (``bf16`` or
``fp8``: blockwise FP8 weights with float32 scales), ``trainer`` (Megatron parallelism: tp,
pp, vpp, dp, ep, etp), ``engine`` (vLLM: tp, replicas, expert_parallel), ``refit`` (streams,
bucket_mib), ``cluster`` (see `benches.simulate.Cluster`), ``local`` (the scaled-down copy run
on this machine: model overrides, trainer and engine layouts, refit options) and optionally
``published`` (figures to compare with).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from backends.megatron_layout import MegatronParallel
from benches.simulate import Cluster

__all__ = ["BenchConfig", "Side", "load"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Side:
    """One layout of the two sides: Megatron trainer, vLLM engine replicas, refit options."""

    model: dict[str, Any]
    trainer: MegatronParallel
    engine_tp: int
    replicas: int
    expert_parallel: bool
    streams: int
    bucket_bytes: int

    @property
    def world(self) -> int:
        return self.trainer.world + self.engine_tp * self.replicas


@dataclass(frozen=True)
class BenchConfig:
    name: str
    precision: str
    full: Side
    local: Side
    cluster: Cluster
    published: list[dict[str, Any]]


def _side(section: str, model: dict, trainer: dict, engine: dict, refit: dict) -> Side:
    try:
        par = MegatronParallel(**trainer)
        return Side(
            model=model,
            trainer=par,
            engine_tp=int(engine.get("tp", 1)),
            replicas=int(engine.get("replicas", 1)),
            expert_parallel=bool(engine.get("expert_parallel", False)),
            streams=int(refit.get("streams", 2)),
            bucket_bytes=int(float(refit.get("bucket_mib", 256)) * 2**20),
        )
    except TypeError as e:
        raise ConfigError(f"{section}: {e}") from None


def load(name_or_path: str, *, precision: str | None = None) -> BenchConfig:
    """Load ``benches/configs/<name>`` (``.yaml`` optional) or a path."""
    path = Path(name_or_path)
    if not path.exists():
        path = CONFIG_DIR / (
            name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml"
        )
    if not path.exists():
        known = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"no config {name_or_path!r}; known: {known}")
    raw = yaml.safe_load(path.read_text())
    missing = [k for k in ("model", "trainer", "engine", "cluster", "local") if k not in raw]
    if missing:
        raise ConfigError(f"{path.name}: missing sections {missing}")
    prec = precision or raw.get("precision", "bf16")
    if prec not in ("bf16", "fp8"):
        raise ConfigError(f"{path.name}: precision must be bf16 or fp8, got {prec!r}")
    model = dict(raw["model"])
    if prec == "fp8":
        model["quantization_config"] = dict(FP8)
    local = raw["local"]
    local_model = {**model, **local.get("model", {})}
    c = raw["cluster"]
    try:
        cluster = Cluster(
            name=str(c.get("name", path.stem)),
            gpus_per_node=int(c["gpus_per_node"]),
            nic_GBps=float(c["nic_gbps"]) / 8,
            nvlink_GBps=float(c["nvlink_GBps"]),
            msg_latency_us=float(c.get("msg_latency_us", 2)),
            round_latency_us=float(c.get("round_latency_us", 20)),
            collective_latency_us=float(c.get("collective_latency_us", 30)),
            copy_GBps=float(c.get("copy_GBps", 1000)),
            copy_overlaps=bool(c.get("copy_overlaps", True)),
        )
    except KeyError as e:
        raise ConfigError(f"{path.name}: cluster needs {e}") from None
    return BenchConfig(
        name=path.stem,
        precision=prec,
        full=_side("full", model, raw["trainer"], raw["engine"], raw.get("refit", {})),
        local=_side(
            "local", local_model, local["trainer"], local["engine"], local.get("refit", {})
        ),
        cluster=cluster,
        published=list(raw.get("published", [])),
    )
