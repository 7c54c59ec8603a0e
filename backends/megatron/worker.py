"""The Megatron-core trainer side: the refit side of one rank, and the Ray group of ranks
handed to `Refitter`.

    refitter = Refitter(MegatronTrainerGroup(actors, hf_config), llm)
    refitter.refit()                    # every RL step

`MegatronRefit` is the refit side of one rank, built from the rank's live model chunks (one
per virtual pipeline stage) after Megatron's parallel state is initialized. It reads each
parameter's facts (name, shape, dtype, ``tensor_model_parallel``, ``partition_dim``,
``partition_stride``, whether it belongs to a MoE layer's routed experts, the layer's global
``layer_number`` and ``local_expert_indices``) and the rank's coordinates in Megatron's
groups, and maps them to HF shards with `backends.megatron.map`. A framework that owns its own
actor class embeds a `MegatronRefit` and forwards `describe`, `refit_connect` and
`refit_step` to it (what the test harness's `harness.megatron_actors.MegatronTrainerRank`
does); the weights are read in place at every refit, so they may change freely between
refits.

`MegatronTrainerGroup.describe` turns every rank's coordinates and shards into the
`TrainerSpec`: per pipeline stage a dense ``(dp, tp)`` mesh and an expert ``(edp, ep, etp)``
mesh (data-parallel replicas are extra senders), every bulk shard's box checked against its
layout. Shards that are not a layout (a padded vocab) are all-gathered over the TP group of
the stage's first rank before each refit and sent whole by that rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from backends.megatron.map import Coords, HFShard, MegatronParam, hf_shards, trainer_spec
from backends.parallel import Parallel
from backends.ray_trainer import Launch, RayTrainerGroup
from refit.errors import RefitError
from refit.spec import TrainerSpec, device_kind
from xfer.segments import Local, copy_in

__all__ = [
    "MegatronRefit",
    "MegatronTrainerGroup",
    "read_coords",
    "read_params",
]


def _unwrap(m: torch.nn.Module) -> torch.nn.Module:
    """The GPT model inside DDP / Float16Module wrappers."""
    while hasattr(m, "module") and isinstance(m.module, torch.nn.Module):
        m = m.module
    return m


def read_params(chunks: Sequence[torch.nn.Module]) -> tuple[list[MegatronParam], dict]:
    """Facts about every parameter of the rank's model chunks (and the routers' expert-bias
    buffers), and the tensors themselves keyed by (chunk, name)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    facts: list[MegatronParam] = []
    tensors: dict[tuple[int, str], torch.Tensor] = {}
    for c, wrapped in enumerate(chunks):
        model = _unwrap(wrapped)
        layers: dict[str, Any] = {}
        expert_ids: set[int] = set()
        decoder = getattr(model, "decoder", None)
        for i, layer in enumerate(getattr(decoder, "layers", [])):
            layers[f"decoder.layers.{i}."] = layer
            if isinstance(layer.mlp, MoELayer):
                expert_ids |= {id(p) for p in layer.mlp.experts.parameters()}
        named = list(model.named_parameters())
        named += [(n, b) for n, b in model.named_buffers() if n.endswith("mlp.router.expert_bias")]
        for name, t in named:
            layer = None
            if name.startswith("decoder.layers."):
                layer = layers[".".join(name.split(".")[:3]) + "."]
            experts = tuple(int(e) for e in getattr(getattr(layer, "mlp", None),
                                                    "local_expert_indices", ()))  # fmt: skip
            facts.append(
                MegatronParam(
                    chunk=c,
                    name=name,
                    shape=tuple(t.shape),
                    dtype=t.dtype,
                    tp_split=bool(getattr(t, "tensor_model_parallel", False)),
                    dim=int(getattr(t, "partition_dim", 0)),
                    stride=int(getattr(t, "partition_stride", 1)),
                    layer=None if layer is None else int(layer.layer_number) - 1,
                    expert=id(t) in expert_ids,
                    experts=experts,
                )
            )
            tensors[(c, name)] = t
    return facts, tensors


def read_coords() -> Coords:
    """This rank's coordinates in Megatron's parallel groups."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    par = Parallel(
        tp=mpu.get_tensor_model_parallel_world_size(),
        cp=mpu.get_context_parallel_world_size(),
        pp=mpu.get_pipeline_model_parallel_world_size(),
        dp=mpu.get_data_parallel_world_size(),
        ep=mpu.get_expert_model_parallel_world_size(),
        etp=mpu.get_expert_tensor_parallel_world_size(),
        vpp=mpu.get_virtual_pipeline_model_parallel_world_size() or 1,
    )
    edp = mpu.get_expert_data_parallel_world_size()
    if edp != par.edp:
        raise RefitError(
            f"rank {dist.get_rank()}: expert data parallel size {edp}, {par!r} gives {par.edp}"
        )
    return Coords(
        rank=dist.get_rank(),
        pp=mpu.get_pipeline_model_parallel_rank(),
        tp=mpu.get_tensor_model_parallel_rank(),
        dp=mpu.get_data_parallel_rank(),
        cp=mpu.get_context_parallel_rank(),
        ep=mpu.get_expert_model_parallel_rank(),
        etp=mpu.get_expert_tensor_parallel_rank(),
        edp=mpu.get_expert_data_parallel_rank(),
        par=par,
    )


class _Detached(Mapping[tuple[int, str], torch.Tensor]):
    """The rank's parameters, each detached when looked up (a view asks for one or two of
    them, once per refit and name)."""

    def __init__(self, tensors: Mapping[tuple[int, str], torch.Tensor]) -> None:
        self._tensors = tensors

    def __getitem__(self, key: tuple[int, str]) -> torch.Tensor:
        return self._tensors[key].detach()

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


class MegatronRefit:
    """The refit side of one Megatron rank (see the module docstring)."""

    def __init__(self, chunks: Sequence[torch.nn.Module], hf_config: Mapping[str, Any]) -> None:
        self.chunks = list(chunks)
        self.config = dict(hf_config)
        self.coords = read_coords()
        facts, tensors = read_params(self.chunks)
        self._params = _Detached(tensors)
        shards = hf_shards(facts, self.config, self.coords)
        self.shards = {s.name: s for s in shards if not s.mirror}
        self.mirrors = [s for s in shards if s.mirror]
        self._whole: dict[str, torch.Tensor] = {}

    def describe(self) -> tuple[Coords, list[HFShard], str]:
        """This rank's coordinates, its HF shards and its device kind (``"cpu"``/``"cuda"``),
        for `MegatronTrainerGroup.describe` (through the framework's own actor calls)."""
        params = (p for chunk in self.chunks for p in chunk.parameters())
        device = next(params).device
        return self.coords, [s.public() for s in self.shards.values()], device_kind(device)

    def local(self, name: str) -> Local:
        """This rank's shard of `name`: a view of its live weights (the whole gathered tensor
        for a misc shard on the stage's first rank)."""
        if name in self._whole:
            return self._whole[name]
        view = self.shards[name].view
        assert view is not None
        return view(self._params)

    def gather_misc(self) -> None:
        """All-gather every misc shard to the stage's first rank (dp 0, tp 0), before a refit.
        Only the TP group of data-parallel rank 0 takes part."""
        import torch.distributed as dist
        from megatron.core import parallel_state as mpu

        c = self.coords
        if c.dp != 0 or c.cp != 0:
            return
        for s in self.shards.values():
            if s.gather is None:
                continue
            axis, dim, key = s.gather
            assert axis == "tp"
            part = self._params[key].contiguous()
            parts = [torch.empty_like(part) for _ in range(c.size("tp"))]
            dist.all_gather(parts, part, group=mpu.get_tensor_model_parallel_group())
            if c.tp == 0:
                self._whole[s.name] = torch.cat(parts, dim).narrow(dim, 0, s.shape[dim])

    def export(self) -> list[tuple[str, tuple[tuple[int, int], ...], torch.Tensor]]:
        """(HF name, box, values) of every shard this rank holds, on the CPU."""
        out = []
        for s in self.shards.values():
            assert s.view is not None
            v = s.view(self._params)
            out.append((s.name, s.box, v.contiguous().cpu()))
        return out

    def load(self, full: Mapping[str, torch.Tensor]) -> None:
        """Set the rank's weights from whole HF tensors (experts grouped `[E, ...]`)."""
        missing = [s.name for s in self.shards.values() if s.name not in full]
        if missing:
            raise RefitError(f"rank {self.coords.rank}: load is missing {missing[:8]}")
        with torch.no_grad():
            for s in [*self.shards.values(), *self.mirrors]:
                assert s.view is not None
                dst = s.view(self._params)
                src = full[s.name][tuple(slice(a, b) for a, b in s.box)]
                copy_in(dst, tuple(slice(0, n) for n in s.local_shape), src.to(dst.device))

    def weights(self) -> Iterator[torch.Tensor]:
        yield from self._params.values()


class MegatronTrainerGroup(RayTrainerGroup):
    """A `TrainerSide` over Megatron trainer ranks: Ray actors with `describe`,
    `refit_connect` and `refit_step` (the framework's own, forwarding to a `MegatronRefit`)."""

    def __init__(
        self,
        actors: Sequence[Any],
        hf_config: Mapping[str, Any],
        launch: Launch | None = None,
    ) -> None:
        super().__init__(actors, launch)
        self.config = dict(hf_config)

    def restart_rank(self, rank: int) -> None:
        raise RefitError(
            "a Megatron rank cannot be restarted alone: its process groups span every rank; "
            "restart the whole group"
        )

    def describe(self) -> TrainerSpec:
        parts = self.run("describe")
        devices = sorted({d for _, _, d in parts})
        if len(devices) > 1:
            raise RefitError(f"the trainer's ranks hold their weights on {devices}")
        return trainer_spec([(c, s) for c, s, _ in parts], self.config, device=devices[0])
