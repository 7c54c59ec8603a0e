"""Torch trainer ranks built from a checkpoint on disk, for tests, demos and benchmarks.

`checkpoint_shards` and `hf_model_shards` are `TorchTrainerRank` build functions
(``TorchTrainerGroup.launch(world, checkpoint_shards, path, dp, tp)``): each rank holds its
shards of an HF checkpoint, under refit's names and the torch trainer's layouts, or under
transformers' own names sharded as FSDP2 shards them. A real trainer's ranks hold their own
weights (`backends.torch.trainer.RefitTrainerMixin`).
"""

from __future__ import annotations

from typing import Any

import torch

from backends.parallel import Parallel
from backends.torch.trainer import trainer_layouts
from refit.errors import RefitError
from xfer import DTensorRef, Layout, Mesh, Shard

__all__ = ["checkpoint_shards", "hf_model_shards"]


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
    on `pp` stages of ``(dp, tp)`` meshes (`trainer_layouts`; with `ep`, experts are split
    over the dp axis), on `device` (``"cuda"``: the rank's current CUDA device). With
    `dtensor_port`, the ranks form a gloo default group on that loopback port and the shards
    are torch `DTensor`s (what FSDP2/torchtitan ranks hold)."""
    import json
    from pathlib import Path

    from harness.hf_checkpoint import load_grouped

    if pp * dp * tp != world:
        raise RefitError(f"pp({pp}) * dp({dp}) * tp({tp}) != world({world})")
    config = json.loads((Path(path) / "config.json").read_text())
    layouts = trainer_layouts(config, Parallel(pp=pp, dp=dp, tp=tp, ep=dp if ep else 1))
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
