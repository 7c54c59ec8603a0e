"""The Megatron-core trainer side: one Ray actor per trainer rank, handed to `Refitter`.

    group = MegatronTrainerGroup.launch(4, hf_config, Parallel(tp=2, pp=2))
    refitter = Refitter(group, llm)
    group.call(train_step)              # the framework's training, on every rank
    refitter.refit()                    # every RL step

`MegatronRefit` is the refit side of one rank, built from the rank's live model chunks (one
per virtual pipeline stage) after Megatron's parallel state is initialized. It reads each
parameter's facts (name, shape, dtype, ``tensor_model_parallel``, ``partition_dim``,
``partition_stride``, whether it belongs to a MoE layer's routed experts, the layer's global
``layer_number`` and ``local_expert_indices``) and the rank's coordinates in Megatron's
groups, and maps them to HF shards with `backends.megatron_map`. A framework that owns its own
actor class embeds a `MegatronRefit` and forwards `describe`, `refit_connect` and
`refit_step` to it (what `MegatronTrainerRank` does); the weights are read in place at every
refit, so they may change freely between refits.

`MegatronTrainerGroup.describe` turns every rank's coordinates and shards into the
`TrainerSpec`: per pipeline stage a dense ``(dp, tp)`` mesh and an expert ``(edp, ep, etp)``
mesh (data-parallel replicas are extra senders), every bulk shard's box checked against its
layout. Shards that are not a layout (a padded vocab) are all-gathered over the TP group of
the stage's first rank before each refit and sent whole by that rank.

`MegatronTrainerRank` is that actor for tests, demos and benchmarks: it starts the default
process group on a loopback port (gloo without CUDA, NCCL with), builds a model from an HF
config (`backends.megatron_model`), and adds forward, export and load of HF weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from backends.megatron_map import Coords, HFShard, MegatronParam, hf_shards, trainer_spec
from backends.megatron_model import Parallel
from backends.ray_trainer import RayTrainerGroup, TrainerRankBase, free_port
from refit.errors import RefitError
from refit.hf import hf_params
from refit.spec import TrainerSpec, device_kind
from xfer.segments import Local, copy_in

__all__ = [
    "MegatronRefit",
    "MegatronTrainerGroup",
    "MegatronTrainerRank",
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

    vpp = mpu.get_virtual_pipeline_model_parallel_world_size() or 1
    return Coords(
        rank=dist.get_rank(),
        pp=mpu.get_pipeline_model_parallel_rank(),
        tp=mpu.get_tensor_model_parallel_rank(),
        dp=mpu.get_data_parallel_rank(),
        cp=mpu.get_context_parallel_rank(),
        ep=mpu.get_expert_model_parallel_rank(),
        etp=mpu.get_expert_tensor_parallel_rank(),
        edp=mpu.get_expert_data_parallel_rank(),
        sizes=(
            ("pp", mpu.get_pipeline_model_parallel_world_size()),
            ("tp", mpu.get_tensor_model_parallel_world_size()),
            ("dp", mpu.get_data_parallel_world_size()),
            ("cp", mpu.get_context_parallel_world_size()),
            ("ep", mpu.get_expert_model_parallel_world_size()),
            ("etp", mpu.get_expert_tensor_parallel_world_size()),
            ("edp", mpu.get_expert_data_parallel_world_size()),
            ("vpp", vpp),
        ),
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


class MegatronTrainerRank(TrainerRankBase):
    """A Megatron trainer rank as a Ray actor: starts the default process group on
    ``127.0.0.1:port``, builds the model for `hf_config` with `parallel`, and serves the
    refit. `forward`, `export` and `load_hf` serve tests and demos."""

    def __init__(
        self,
        rank: int,
        world: int,
        port: int,
        hf_config: Mapping[str, Any],
        parallel: Parallel,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        threads: int = 1,
    ) -> None:
        import torch.distributed as dist

        from backends.megatron_model import build

        torch.set_num_threads(threads)
        self.rank = rank
        self.world = world
        self.config = dict(hf_config)
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(0)  # Ray gives each actor its own GPU
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
        )
        self.chunks = build(self.config, parallel, seed=seed, dtype=dtype)
        self._side: MegatronRefit | None = None

    @property
    def side(self) -> MegatronRefit:
        """The refit side, mapped on first use (so a model it cannot map fails `describe`,
        naming every parameter, and the rank stays up)."""
        if self._side is None:
            self._side = MegatronRefit(self.chunks, self.config)
        return self._side

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def describe(self) -> tuple[Coords, list[HFShard], str]:
        return self.side.describe()

    def local(self, name: str) -> Local:
        return self.side.local(name)

    def weights(self) -> Iterator[torch.Tensor]:
        return self.side.weights()

    def before_step(self) -> None:
        self.side.gather_misc()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor | None:
        from backends.megatron_model import forward_logits

        return forward_logits(self.chunks, tokens, self.config["vocab_size"])

    def export(self) -> list[tuple[str, tuple[tuple[int, int], ...], torch.Tensor]]:
        return self.side.export()

    def load_hf(self, path: str, step: int = 0) -> None:
        """Load the HF checkpoint at `path` (with `step` > 0: `tiny_models.step_weights` of
        it, the tests' training step)."""
        from backends.hf_checkpoint import load_grouped
        from backends.tiny_models import step_weights

        full = load_grouped(path)
        self.side.load(step_weights(full, step) if step else full)


class MegatronTrainerGroup(RayTrainerGroup):
    """A `TrainerSide` over Megatron trainer ranks (Ray actors with `describe`,
    `refit_connect`, `refit_step`; `MegatronTrainerRank` or the framework's own)."""

    def __init__(
        self,
        actors: Sequence[Any],
        hf_config: Mapping[str, Any],
        launch: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(actors, launch)
        self.config = dict(hf_config)
        self._shapes = {p.name: p.shape for p in hf_params(self.config)}

    @classmethod
    def launch(
        cls,
        world: int,
        hf_config: Mapping[str, Any],
        parallel: Parallel,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        num_cpus: float = 0.5,
        num_gpus: float | None = None,
        threads: int = 1,
    ) -> MegatronTrainerGroup:
        """Start `world` `MegatronTrainerRank` actors (one GPU each where there is CUDA)."""
        parallel.sizes(world)  # raises if the layout does not fit
        launch = dict(
            world=world,
            port=free_port(),
            config=dict(hf_config),
            parallel=parallel,
            seed=seed,
            dtype=dtype,
            num_cpus=num_cpus,
            num_gpus=(1 if torch.cuda.is_available() else 0) if num_gpus is None else num_gpus,
            threads=threads,
        )
        group = cls([cls._start(launch, r) for r in range(world)], hf_config, launch)
        group.run("describe")  # wait until every rank is built (errors name the rank)
        return group

    @staticmethod
    def _start(launch: dict[str, Any], rank: int) -> Any:
        import ray

        actor = ray.remote(num_cpus=launch["num_cpus"], num_gpus=launch["num_gpus"])(
            MegatronTrainerRank
        )
        return actor.remote(
            rank,
            launch["world"],
            launch["port"],
            launch["config"],
            launch["parallel"],
            seed=launch["seed"],
            dtype=launch["dtype"],
            threads=launch["threads"],
        )

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

    def export_hf(self) -> dict[str, torch.Tensor]:
        """Every HF parameter assembled from the ranks' shards (each element from every rank
        that holds it, which must agree bit for bit)."""
        full: dict[str, torch.Tensor] = {}
        filled: dict[str, torch.Tensor] = {}
        problems = []
        for rank, shards in enumerate(self.run("export")):
            for name, box, values in shards:
                index = tuple(slice(a, b) for a, b in box)
                if name not in full:
                    shape = self._shapes[name]
                    full[name] = torch.zeros(shape, dtype=values.dtype)
                    filled[name] = torch.zeros(shape, dtype=torch.bool)
                seen = filled[name][index]
                old = full[name][index]
                if seen.any() and not torch.equal(
                    old[seen].view(torch.uint8), values[seen].view(torch.uint8)
                ):
                    problems.append(f"{name!r}: rank {rank} disagrees with an earlier replica")
                full[name][index] = values
                filled[name][index] = True
        for name, f in filled.items():
            if not f.all():
                problems.append(f"{name!r}: {int((~f).sum())} elements held by no rank")
        if problems:
            raise RefitError(problems)
        return full

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Megatron's own logits for `tokens` ``[batch, seq]`` (from the last stage)."""
        outs = [o for o in self.run("forward", tokens) if o is not None]
        return outs[0]

    def load_hf(self, path: str | Path, step: int = 0) -> None:
        self.run("load_hf", str(path), step)
