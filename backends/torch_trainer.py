"""The trainer side for plain PyTorch / DTensor models (FSDP2, torchtitan users).

`TorchTrainerRank` is one trainer rank: it holds HF-named parameters, each a torch `DTensor`
or a `DTensorRef` (local shard + `Layout` over the trainer's ranks). It describes them, joins
the refit groups and sends its shards at every refit. `TorchTrainerGroup` drives a group of
them as Ray actors (one per rank) and is the `TrainerSide` a `Refitter` takes.

A parameter's pipeline stage is the stage whose ranks hold it (`stage_ranks`; one stage of
all ranks by default). The ranks' own training (optimizer steps ...) runs through
`TorchTrainerGroup.call`, which calls a function on every rank with the rank object.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from backends.ray_trainer import RayPending, RayTrainerGroup, TrainerRankBase
from refit.errors import RefitError
from refit.hf import Role, fused_parts, hf_params
from refit.spec import SourceParam, TrainerSpec, device_kind
from xfer import DTensorRef, Layout, Mesh, Replicate, Shard
from xfer.layout import Placement
from xfer.segments import Local

_ROW_SPLIT = {Role.EMBED, Role.LM_HEAD, Role.Q, Role.K, Role.V, Role.GATE, Role.UP}
_ROW_SPLIT |= {Role.Q_BIAS, Role.K_BIAS, Role.V_BIAS, Role.MLA_Q_B, Role.MLA_Q, Role.MLA_KV_B}


def pipeline_stage(layer: int | None, name: str, num_layers: int, pp: int) -> int:
    """Stage of a parameter when `num_layers` layers are split evenly over `pp` stages: the
    embedding on the first stage, the final norm and the head on the last."""
    if layer is not None:
        return layer * pp // num_layers
    return 0 if "embed_tokens" in name else pp - 1


def parallel_layouts(
    config: Mapping[str, Any],
    meshes: Mesh | Sequence[Mesh],
    *,
    tp: str = "tp",
    ep: str | None = None,
) -> dict[str, Layout]:
    """Tensor-parallel (and expert-parallel) layouts of every HF parameter, the way Megatron
    and torchtitan split them: column-parallel weights and the vocab on dim 0, row-parallel
    weights on dim 1, experts on dim 0 over the `ep` axis and on their intermediate dim over
    `tp`, everything else replicated (other axes replicate). With several meshes (one per
    pipeline stage) each parameter lives on its stage's mesh (`pipeline_stage`)."""
    stages = [meshes] if isinstance(meshes, Mesh) else list(meshes)
    out = {}
    for p in hf_params(config):
        mesh = stages[pipeline_stage(p.layer, p.name, config["num_hidden_layers"], len(stages))]
        place: list[Placement] = [Replicate()] * mesh.ndim
        t = mesh.axis_index(tp)
        if p.role in _ROW_SPLIT:
            place[t] = Shard(0)
        elif p.role in (Role.OUT, Role.DOWN) or p.role in (Role.EXPERT_GATE, Role.EXPERT_UP):
            place[t] = Shard(1)
        elif p.role == Role.EXPERT_DOWN:
            place[t] = Shard(2)
        if ep is not None and p.role in (Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN):
            place[mesh.axis_index(ep)] = Shard(0)
        out[p.name] = Layout(mesh, place, p.shape)
    return out


__all__ = [
    "RayPending",
    "RefitTrainerMixin",
    "TorchTrainerGroup",
    "TorchTrainerRank",
    "canonical_refs",
    "checkpoint_shards",
    "hf_model_shards",
    "merge_descriptions",
    "rank_description",
    "metadata_spec",
    "parallel_layouts",
    "pipeline_stage",
    "stage_meshes",
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
    config: Mapping[str, Any],
    *,
    pp: int = 1,
    dp: int = 1,
    tp: int = 1,
    ep: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> TrainerSpec:
    """The `TrainerSpec` a torch trainer on `pp` stages of ``(dp, tp)`` meshes would describe
    (with `ep`, experts split over dp: DeepSeek's PP x EP is ``pp, dp=ep, tp=1``), from
    metadata only."""
    from refit.hf import hf_dtype

    meshes = stage_meshes(pp, dp, tp)
    layouts = parallel_layouts(config, meshes, ep="dp" if ep else None)
    params = []
    for p in hf_params(config):
        lay = layouts[p.name]
        stage = next(s for s, m in enumerate(meshes) if m == lay.mesh)
        params.append(SourceParam(p.name, p.shape, hf_dtype(p, config, dtype), stage, lay))
    return TrainerSpec(
        world=pp * dp * tp, stage_ranks=tuple(m.flat for m in meshes), params=tuple(params)
    )


def stage_meshes(pp: int, dp: int, tp: int) -> list[Mesh]:
    """Ranks ``0..pp*dp*tp-1`` as `pp` stages of ``(dp, tp)`` meshes, stage-major."""
    ranks = torch.arange(pp * dp * tp).reshape(pp, dp, tp)
    return [Mesh(ranks[s].tolist(), ("dp", "tp")) for s in range(pp)]


def checkpoint_shards(
    rank: int,
    world: int,
    path: str,
    dp: int,
    tp: int,
    ep: bool = False,
    pp: int = 1,
    dtensor_port: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """A `TorchTrainerRank` build function: this rank's shards of the checkpoint at `path`,
    on `pp` stages of ``(dp, tp)`` meshes (`parallel_layouts`; with `ep`, experts are split
    over the dp axis), on `device` (``"cuda"``: the rank's current CUDA device). With
    `dtensor_port`, the ranks form a gloo default group on that loopback port and the shards
    are torch `DTensor`s (what FSDP2/torchtitan ranks hold)."""
    import json
    from pathlib import Path

    from backends.hf_checkpoint import load_grouped

    if pp * dp * tp != world:
        raise RefitError(f"pp({pp}) * dp({dp}) * tp({tp}) != world({world})")
    config = json.loads((Path(path) / "config.json").read_text())
    layouts = parallel_layouts(config, stage_meshes(pp, dp, tp), ep="dp" if ep else None)
    full = load_grouped(path)
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else "cpu"
    shards = {
        name: DTensorRef(full[name][lay.box(rank)].to(dev, copy=True), lay)
        for name, lay in layouts.items()
        if lay.holds(rank)
    }
    if dtensor_port is None:
        return shards
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{dtensor_port}", rank=rank, world_size=world
    )
    meshes: dict[Mesh, DeviceMesh] = {}
    out: dict[str, Any] = {}
    for name, ref in shards.items():
        m = ref.layout.mesh
        if m not in meshes:
            meshes[m] = DeviceMesh("cpu", torch.tensor(m.ranks), mesh_dim_names=m.axes)
        assert ref.local is not None
        out[name] = DTensor.from_local(
            ref.local,
            meshes[m],
            ref.layout.placements,
            run_check=False,
            shape=ref.layout.shape,
            stride=torch.empty(ref.layout.shape, device="meta").stride(),
        )
    return out


def hf_model_shards(rank: int, world: int, path: str, device: str = "cpu") -> dict[str, Any]:
    """A `TorchTrainerRank` build function: the parameters of the transformers model at `path`,
    under transformers' own names (experts fused in transformers 5), each sharded on dim 0
    over all `world` ranks as FSDP2 shards them: what an FSDP2 trainer rank holds."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    mesh = Mesh(list(range(world)), ("dp",))
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else "cpu"
    out: dict[str, Any] = {}
    for name, p in model.named_parameters():
        lay = Layout(mesh, [Shard(0)], tuple(p.shape))
        out[name] = DTensorRef(p.detach()[lay.box(rank)].to(dev, copy=True), lay)
    return out


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

        launch = dict(
            world=world,
            build=build,
            build_args=build_args,
            stage_ranks=stage_ranks,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            threads=threads,
            resources=dict(resources or {}),
        )
        return cls([cls._start(launch, r) for r in range(world)], launch)

    @staticmethod
    def _start(launch: dict[str, Any], rank: int) -> Any:
        import ray

        actor = ray.remote(
            num_cpus=launch["num_cpus"],
            num_gpus=launch.get("num_gpus", 0),
            resources=launch.get("resources") or None,
        )(TorchTrainerRank)
        return actor.remote(
            rank,
            launch["world"],
            launch["build"],
            *launch["build_args"],
            stage_ranks=launch["stage_ranks"],
            threads=launch["threads"],
        )

    def describe(self) -> TrainerSpec:
        import ray

        return merge_descriptions(ray.get([self._remote(a, "describe")() for a in self.actors]))
