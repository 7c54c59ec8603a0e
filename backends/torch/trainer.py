"""The trainer side for plain PyTorch / DTensor models (FSDP2, torchtitan users).

`TorchTrainerRank` is one trainer rank: it holds HF-named parameters, each a torch `DTensor`
or a `DTensorRef` (local shard + `Layout` over the trainer's ranks). It describes them, joins
the refit groups and sends its shards at every refit. `TorchTrainerGroup` drives a group of
them as Ray actors (one per rank) and is the `TrainerSide` a `Refitter` takes.

A parameter's pipeline stage is the stage whose ranks hold it (`stage_ranks`; one stage of
all ranks by default). The ranks' own training (optimizer steps ...) runs through
`TorchTrainerGroup.call`, which calls a function on every rank with the rank object.

`parallel_layouts` gives every HF parameter's layout over given meshes, split the way Megatron
and torchtitan split them (`backends.parallel`); `trainer_layouts` and `metadata_spec` give
them, and the whole `TrainerSpec`, for a trainer's `backends.parallel.Parallel` sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from backends.parallel import EXPERTS, TP_DIM, Parallel, stage_of
from backends.ray_trainer import RayPending, RayTrainerGroup, TrainerRankBase
from refit.errors import RefitError
from refit.hf import fused_parts, hf_dtype, hf_params
from refit.spec import SourceParam, TrainerSpec, device_kind
from xfer import DTensorRef, Layout, Mesh, Replicate, Shard
from xfer.layout import Placement
from xfer.segments import Local


def parallel_layouts(
    config: Mapping[str, Any],
    meshes: Mesh | Sequence[Mesh],
    *,
    tp: str = "tp",
    ep: str | None = None,
) -> dict[str, Layout]:
    """Tensor-parallel (and expert-parallel) layouts of every HF parameter, the way Megatron
    and torchtitan split them (`backends.parallel.TP_DIM`): column-parallel weights and the
    vocab on dim 0, row-parallel weights on dim 1, experts on dim 0 over the `ep` axis and on
    their intermediate dim over `tp`, everything else replicated (other axes replicate). With
    several meshes (one per pipeline stage) each parameter lives on its stage's mesh
    (`backends.parallel.stage_of`)."""
    stages = [meshes] if isinstance(meshes, Mesh) else list(meshes)
    out = {}
    for p in hf_params(config):
        mesh = stages[stage_of(p, config["num_hidden_layers"], len(stages))]
        place: list[Placement] = [Replicate()] * mesh.ndim
        t = mesh.axis_index(tp)
        if p.role in TP_DIM:
            place[t] = Shard(TP_DIM[p.role])
        if ep is not None and p.role in EXPERTS:
            place[mesh.axis_index(ep)] = Shard(0)
        out[p.name] = Layout(mesh, place, p.shape)
    return out


def trainer_layouts(config: Mapping[str, Any], par: Parallel) -> dict[str, Layout]:
    """`parallel_layouts` of a torch trainer with parallel sizes `par`: its ranks are
    `par`'s pipeline stages of ``(dp, tp)`` meshes (`Parallel.dense_mesh`), its experts are
    split on their intermediate dim over tp (etp == tp) and, with ``ep == dp > 1``, on dim 0
    over dp (DeepSeek's PP x EP is ``Parallel(pp=pp, dp=ep, ep=ep)``)."""
    problems = []
    if par.ep not in (1, par.dp):
        problems.append(f"ep({par.ep}) must be 1 or dp({par.dp}): experts are split over dp")
    if par.etp != par.tp:
        problems.append(f"etp({par.etp}) must be tp({par.tp}): experts are split over tp")
    problems += [f"{k}({par.size(k)}) must be 1" for k in ("cp", "vpp") if par.size(k) != 1]
    if problems:
        raise RefitError([f"torch trainer {par!r}: {x}" for x in problems])
    meshes = [par.dense_mesh(s) for s in range(par.pp)]
    return parallel_layouts(config, meshes, ep="dp" if par.ep > 1 else None)


__all__ = [
    "RayPending",
    "RefitTrainerMixin",
    "TorchTrainerGroup",
    "TorchTrainerRank",
    "canonical_refs",
    "merge_descriptions",
    "metadata_spec",
    "parallel_layouts",
    "rank_description",
    "trainer_layouts",
]


def _as_ref(value: Any) -> DTensorRef:
    if isinstance(value, DTensorRef):
        return value
    if type(value).__name__ == "DTensor":
        return DTensorRef.from_dtensor(value)
    raise RefitError(f"expected a DTensor or DTensorRef, got {type(value).__name__}")


def canonical_refs(params: Mapping[str, Any]) -> dict[str, DTensorRef]:
    """HF-named parameters as refit names them: DTensors become `DTensorRef`s, and the fused
    expert tensors of transformers 5 (``experts.gate_up_proj``, ``experts.down_proj``) become
    views of the grouped gate, up and down projections (`refit.hf.fused_parts`), no copy. A
    fused tensor may be sharded on its expert dim (dim 0, as FSDP2 and expert parallelism do)
    or its last dim, not on the dim the halves split. gpt-oss keeps tensors of these names
    (with ``_bias`` siblings) in its checkpoint: they stay as they are."""
    out: dict[str, DTensorRef] = {}
    problems = []
    for name, value in params.items():
        ref = _as_ref(value)
        parts = fused_parts(name, ref.layout.shape)
        if parts is None or f"{name}_bias" in params:  # gpt-oss: its checkpoint's own names
            out[name] = ref
            continue
        if parts is None:
            out[name] = ref
            continue
        lay = ref.layout
        split = [
            f"axis {a!r}"
            for a, p in zip(lay.mesh.axes, lay.placements, strict=True)
            if isinstance(p, Shard) and p.dim == 1
        ]
        if split:
            problems.append(
                f"{name!r}: {lay!r} shards dim 1 (gate|up or H) over {split}; shard the fused "
                "experts on dim 0 or 2 so each projection is a view"
            )
            continue
        for canon, index in parts:
            shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, lay.shape, strict=True))
            local = None if ref.local is None else ref.local[index]
            out[canon] = DTensorRef(local, Layout(lay.mesh, lay.placements, shape))
    if problems:
        raise RefitError(problems)
    return out


def metadata_spec(
    config: Mapping[str, Any], par: Parallel, *, dtype: torch.dtype = torch.bfloat16
) -> TrainerSpec:
    """The `TrainerSpec` a torch trainer with parallel sizes `par` would describe
    (`trainer_layouts`), from metadata only."""
    layouts = trainer_layouts(config, par)
    stages = [par.dense_mesh(s) for s in range(par.pp)]
    params = []
    for p in hf_params(config):
        lay = layouts[p.name]
        stage = stages.index(lay.mesh)
        params.append(SourceParam(p.name, p.shape, hf_dtype(p, config, dtype), stage, lay))
    return TrainerSpec(
        world=par.world, stage_ranks=tuple(m.flat for m in stages), params=tuple(params)
    )


def rank_description(
    params: Mapping[str, DTensorRef], stage_ranks: Sequence[Sequence[int]], rank: int
) -> tuple[tuple[tuple[int, ...], ...], list[SourceParam], str]:
    """(stage ranks, this rank's parameters, device kind): what one rank tells
    `merge_descriptions`."""
    stages = tuple(tuple(s) for s in stage_ranks)
    devices = {ref.local.device for ref in params.values() if ref.local is not None}
    if len(devices) > 1:
        raise RefitError(f"trainer rank {rank} holds its shards on {sorted(map(str, devices))}")
    out = []
    for name, ref in params.items():
        ranks = set(ref.layout.mesh.flat)
        stage = next((s for s, members in enumerate(stages) if ranks <= set(members)), None)
        if stage is None:
            raise RefitError(
                f"rank {rank}: {name!r} lives on {ref.layout.mesh!r}, not inside one pipeline "
                f"stage of {stages}"
            )
        dtype = ref.local.dtype if ref.local is not None else torch.float32
        out.append(SourceParam(name, ref.layout.shape, dtype, stage, ref.layout))
    device = device_kind(devices.pop()) if devices else "cpu"
    return stages, out, device


def merge_descriptions(
    parts: Sequence[tuple[tuple[tuple[int, ...], ...], Sequence[SourceParam], str]],
) -> TrainerSpec:
    """The `TrainerSpec` of a trainer from every rank's `rank_description`, in rank order:
    ranks must agree on the stages, the device and every parameter they share."""
    stage_ranks = parts[0][0]
    merged: dict[str, SourceParam] = {}
    problems = []
    devices = sorted({d for _, _, d in parts})
    if len(devices) > 1:
        problems.append(f"the trainer's ranks hold their shards on {devices}")
    for rank, (stages, params, _) in enumerate(parts):
        if stages != stage_ranks:
            problems.append(f"trainer rank {rank} has stages {stages}, rank 0 {stage_ranks}")
        for p in params:
            seen = merged.setdefault(p.name, p)
            if seen != p:
                problems.append(
                    f"trainer ranks disagree on {p.name!r}: {seen.layout!r} {seen.dtype} vs "
                    f"rank {rank}: {p.layout!r} {p.dtype}"
                )
    if problems:
        raise RefitError(problems)
    return TrainerSpec(
        world=len(parts), stage_ranks=stage_ranks, params=tuple(merged.values()), device=devices[0]
    )


class RefitTrainerMixin(TrainerRankBase):
    """Mix into your own trainer actor (one per rank) to make it refittable.

    Implement `refit_params`: this rank's HF-named parameters, each a torch `DTensor` or an
    `xfer.DTensorRef` (local shard + `Layout` over the trainer's ranks), as views of the
    live weights (an optimizer step updates them in place); transformers-5 fused experts
    are accepted. Set ``self.rank`` (and ``self.stage_ranks`` with pipeline stages: each
    stage's trainer ranks). `TorchTrainerGroup(actors)` then drives the actors. The
    parameters are read once, when the rank first describes itself (`refit_reload` reads
    them again, e.g. after the framework re-created its model)."""

    stage_ranks: tuple[tuple[int, ...], ...] = ()
    _params: dict[str, DTensorRef] | None = None

    def refit_params(self) -> Mapping[str, Any]:
        raise NotImplementedError

    @property
    def params(self) -> dict[str, DTensorRef]:
        if self._params is None:
            self._params = canonical_refs(self.refit_params())
        return self._params

    def refit_reload(self) -> None:
        self._params = None

    def device(self) -> torch.device:
        devices = {ref.local.device for ref in self.params.values() if ref.local is not None}
        if len(devices) > 1:
            raise RefitError(
                f"trainer rank {self.rank} holds its shards on {sorted(map(str, devices))}"
            )
        return devices.pop() if devices else torch.device("cpu")

    def describe(self) -> tuple[tuple[tuple[int, ...], ...], list[SourceParam], str]:
        """(stage ranks, this rank's parameters, device kind), for `TorchTrainerGroup`."""
        stages = self.stage_ranks or self._one_stage()
        return rank_description(self.params, stages, self.rank)

    def _one_stage(self) -> tuple[tuple[int, ...], ...]:
        world = 1 + max((max(r.layout.mesh.flat) for r in self.params.values()), default=0)
        return (tuple(range(world)),)

    def local(self, name: str) -> Local:
        ref = self.params[name]
        assert ref.local is not None, f"rank {self.rank} holds no shard of {name}"
        return ref.local

    def weights(self) -> Iterator[torch.Tensor]:
        for ref in self.params.values():
            if isinstance(ref.local, torch.Tensor):
                yield ref.local


class TorchTrainerRank(RefitTrainerMixin):
    """One trainer rank. `build(rank, world)` returns its HF-named parameters."""

    def __init__(
        self,
        rank: int,
        world: int,
        build: Callable[..., Mapping[str, Any]],
        *build_args: Any,
        stage_ranks: Sequence[Sequence[int]] | None = None,
        threads: int = 1,
    ) -> None:
        torch.set_num_threads(threads)
        self.rank = rank
        self.world = world
        self.stage_ranks = tuple(tuple(s) for s in (stage_ranks or [range(world)]))
        self._built = build(rank, world, *build_args)
        self._params = canonical_refs(self._built)

    def refit_params(self) -> Mapping[str, Any]:
        return self._built


@dataclass(frozen=True)
class TorchLaunch:
    """The arguments `TorchTrainerGroup.launch` started its ranks with."""

    world: int
    build: Callable[..., Mapping[str, Any]]
    build_args: tuple[Any, ...]
    stage_ranks: tuple[tuple[int, ...], ...] | None
    num_cpus: float
    num_gpus: float
    threads: int
    resources: tuple[tuple[str, float], ...]  # Ray custom resources, sorted by name

    def start(self, rank: int) -> Any:
        """A Ray actor running `TorchTrainerRank` `rank`."""
        import ray

        actor = ray.remote(
            num_cpus=self.num_cpus, num_gpus=self.num_gpus, resources=dict(self.resources) or None
        )(TorchTrainerRank)
        return actor.remote(
            rank,
            self.world,
            self.build,
            *self.build_args,
            stage_ranks=self.stage_ranks,
            threads=self.threads,
        )


class TorchTrainerGroup(RayTrainerGroup):
    """A `TrainerSide` over Ray actors running `TorchTrainerRank`, one per rank.

    `restart_rank` rebuilds a rank with the launch's build function (a real trainer restores
    its weights from its own checkpoint)."""

    @classmethod
    def launch(
        cls,
        world: int,
        build: Callable[..., Mapping[str, Any]],
        *build_args: Any,
        stage_ranks: Sequence[Sequence[int]] | None = None,
        num_cpus: float = 0.5,
        num_gpus: float = 0,
        threads: int = 1,
        resources: Mapping[str, float] | None = None,
    ) -> TorchTrainerGroup:
        """Start `world` Ray actors; rank r builds its parameters with ``build(r, world, ...)``.
        With `num_gpus` (1 for a GPU trainer) Ray gives each rank its own GPU; `resources`
        (Ray custom resources) places the ranks on the nodes that have them."""

        launch = TorchLaunch(
            world=world,
            build=build,
            build_args=tuple(build_args),
            stage_ranks=None if stage_ranks is None else tuple(map(tuple, stage_ranks)),
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            threads=threads,
            resources=tuple(sorted((resources or {}).items())),
        )
        return cls([launch.start(r) for r in range(world)], launch)

    def describe(self) -> TrainerSpec:
        import ray

        return merge_descriptions(ray.get([self._remote(a, "describe")() for a in self.actors]))
