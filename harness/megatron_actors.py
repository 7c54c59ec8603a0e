"""Megatron-core trainer ranks for tests, demos and benchmarks, as Ray actors.

    group = MegatronTrainerGroup.launch(4, hf_config, Parallel(tp=2, pp=2))
    refitter = Refitter(group, llm)
    group.load_hf(path, 1)              # stands for a training step
    refitter.refit()

`MegatronTrainerRank` starts the default process group on a loopback port (gloo without
CUDA, NCCL with), builds a model from an HF config (`harness.megatron_model`) and serves the
refit through the product's `MegatronRefit`; it adds forward, export and load of HF weights.
`MegatronTrainerGroup` is the product's group (`backends.megatron.worker`) with `launch` (start
such ranks) and the calls the tests make on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backends.megatron import worker
from backends.megatron.map import Coords, HFShard
from backends.megatron.worker import MegatronRefit
from backends.parallel import Parallel
from backends.ray_trainer import TrainerRankBase, free_port
from refit.errors import RefitError
from refit.hf import hf_params
from xfer.segments import Local

__all__ = ["MegatronLaunch", "MegatronTrainerGroup", "MegatronTrainerRank"]


class MegatronTrainerRank(TrainerRankBase):
    """A Megatron trainer rank as a Ray actor: starts the default process group on
    ``127.0.0.1:port``, builds the model for `hf_config` with `parallel` (Megatron pads the
    vocab to a multiple of `vocab_divisible_by` * tp), and serves the refit through its
    `MegatronRefit`. `forward`, `export` and `load_hf` serve tests and demos."""

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
        vocab_divisible_by: int = 128,
    ) -> None:
        import torch.distributed as dist

        from harness.megatron_model import build

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
        self.chunks = build(
            self.config, parallel, seed=seed, dtype=dtype, vocab_divisible_by=vocab_divisible_by
        )
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
        from harness.megatron_model import forward_logits

        return forward_logits(self.chunks, tokens, self.config["vocab_size"])

    def export(self) -> list[tuple[str, tuple[tuple[int, int], ...], torch.Tensor]]:
        return self.side.export()

    def load_hf(self, path: str, step: int = 0) -> None:
        """Load the HF checkpoint at `path` (with `step` > 0: `tiny_models.step_weights` of
        it, the tests' training step)."""
        from harness.hf_checkpoint import load_grouped
        from harness.tiny_models import step_weights

        full = load_grouped(path)
        self.side.load(step_weights(full, step) if step else full)


@dataclass(frozen=True)
class MegatronLaunch:
    """The arguments `MegatronTrainerGroup.launch` started its ranks with."""

    world: int
    port: int  # of the default process group, on 127.0.0.1
    config: tuple[tuple[str, Any], ...]  # the HF config's items, sorted by key
    parallel: Parallel
    seed: int
    dtype: torch.dtype
    num_cpus: float
    num_gpus: float
    threads: int
    vocab_divisible_by: int

    def start(self, rank: int) -> Any:
        """A Ray actor running `MegatronTrainerRank` `rank`."""
        import ray

        actor = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus)(MegatronTrainerRank)
        return actor.remote(
            rank,
            self.world,
            self.port,
            dict(self.config),
            self.parallel,
            seed=self.seed,
            dtype=self.dtype,
            threads=self.threads,
            vocab_divisible_by=self.vocab_divisible_by,
        )


class MegatronTrainerGroup(worker.MegatronTrainerGroup):
    """The product's `MegatronTrainerGroup`, started by `launch` as `MegatronTrainerRank`
    actors, with the calls tests and demos make on every rank."""

    def __init__(
        self,
        actors: Sequence[Any],
        hf_config: Mapping[str, Any],
        launch: MegatronLaunch | None = None,
    ) -> None:
        super().__init__(actors, hf_config, launch)
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
        vocab_divisible_by: int = 128,
    ) -> MegatronTrainerGroup:
        """Start `world` `MegatronTrainerRank` actors (one GPU each where there is CUDA)."""
        if parallel.world != world:
            raise RefitError(f"{parallel!r} cannot run on {world} ranks")
        launch = MegatronLaunch(
            world=world,
            port=free_port(),
            config=tuple(sorted(hf_config.items())),
            parallel=parallel,
            seed=seed,
            dtype=dtype,
            num_cpus=num_cpus,
            num_gpus=(1 if torch.cuda.is_available() else 0) if num_gpus is None else num_gpus,
            threads=threads,
            vocab_divisible_by=vocab_divisible_by,
        )
        group = cls([launch.start(r) for r in range(world)], hf_config, launch)
        group.run("describe")  # wait until every rank is built (errors name the rank)
        return group

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
