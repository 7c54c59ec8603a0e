"""Megatron-core's parameter placement, as pure functions of the config and parallelism.

Ranks, meshes and stages follow `backends.parallel` (Megatron's default order; layers split
evenly over ``pp * vpp`` model chunks, chunk ``c`` on stage ``c % pp``; the embedding on the
first stage, the final norm and the head on the last). Per role, `backends.parallel.TP_DIM`
says which dim is split over TP (the tp axis; routed experts: over ETP, and on dim 0 over EP),
norms and routers are replicated. `megatron_spec` gives the whole `TrainerSpec` from metadata;
the live Megatron worker (`backends.megatron.worker`) describes the same thing from the model
it holds (the end-to-end scenario checks they agree).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from backends.parallel import EXPERTS, TP_DIM, Parallel, stage_of
from refit.hf import HFParam, Role, hf_dtype, hf_params
from refit.spec import SourceParam, TrainerSpec
from xfer import Layout, Replicate, Shard
from xfer.layout import Placement

__all__ = ["megatron_layout", "megatron_spec"]


def megatron_layout(p: HFParam, stage: int, par: Parallel, *, te: bool = True) -> Layout:
    """`p`'s layout. MLA's down projections are replicated with Transformer Engine's layer
    spec (its linear layers there are "duplicated") and split on dim 0 over TP with the
    local spec (column-parallel layers), `te` says which."""
    if p.role in EXPERTS:
        mesh = par.expert_mesh(stage)
        return Layout(mesh, [Replicate(), Shard(0), Shard(TP_DIM[p.role])], p.shape)
    mesh = par.dense_mesh(stage)
    dim = TP_DIM.get(p.role)
    if dim is None and not te and p.role in (Role.MLA_Q_A, Role.MLA_KV_A):
        dim = 0
    tp: Placement = Replicate() if dim is None else Shard(dim)
    return Layout(mesh, [Replicate(), tp], p.shape)


def megatron_spec(
    config: Mapping[str, Any],
    par: Parallel,
    *,
    dtype: torch.dtype = torch.bfloat16,
    te: bool = True,
) -> TrainerSpec:
    """What a Megatron trainer with parallelism `par` holds, from metadata only (with
    Transformer Engine's layer spec, or with the local spec: `te`)."""
    nl = config["num_hidden_layers"]
    params = []
    for p in hf_params(config):
        s = stage_of(p, nl, par.pp, par.vpp)
        params.append(
            SourceParam(
                p.name, p.shape, hf_dtype(p, config, dtype), s, megatron_layout(p, s, par, te=te)
            )
        )
    return TrainerSpec(
        world=par.world,
        stage_ranks=tuple(par.stage_ranks(s) for s in range(par.pp)),
        params=tuple(params),
    )
