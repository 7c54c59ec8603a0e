"""Megatron-core's parameter placement, as pure functions of the config and parallelism.

Ranks follow Megatron's default order: tensor-parallel fastest, then data-parallel, then
pipeline stages (``rank = tp_rank + tp * (dp_rank + dp * pp_rank)``). Inside a stage, expert
layers use the same ranks as an ``(edp, ep, etp)`` mesh (expert-TP fastest), with
``edp * ep * etp == dp * tp``. Layers are split evenly over ``pp * vpp`` model chunks, chunk
``c`` on stage ``c % pp`` (interleaved virtual pipeline); the embedding is on the first stage,
the final norm and the head on the last.

Per role (TP = the tp axis; experts use ep and etp): the vocab and column-parallel weights are
split on dim 0 over TP, row-parallel weights on dim 1, experts on dim 0 over EP and on their
intermediate dim over ETP, norms and routers replicated. `megatron_spec` gives the whole
`TrainerSpec` from metadata; the live Megatron worker (`backends.megatron_worker`) describes
the same thing from the model it holds (the end-to-end scenario checks they agree).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from refit.errors import RefitError
from refit.hf import HFParam, Role, hf_dtype, hf_params
from refit.spec import SourceParam, TrainerSpec
from xfer import Layout, Mesh, Replicate, Shard
from xfer.layout import Placement

__all__ = ["MegatronParallel", "megatron_layout", "megatron_spec", "stage_of"]

_COLUMN = {Role.EMBED, Role.LM_HEAD, Role.Q, Role.K, Role.V, Role.GATE, Role.UP}
_COLUMN |= {Role.Q_BIAS, Role.K_BIAS, Role.V_BIAS, Role.MLA_Q_B, Role.MLA_Q, Role.MLA_KV_B}
_EXPERTS = {Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN}


class MegatronParallel:
    """Sizes of one Megatron layout: ``tp * dp * pp`` ranks; experts ``edp * ep * etp``."""

    def __init__(
        self, *, tp: int = 1, pp: int = 1, dp: int = 1, ep: int = 1, etp: int = 1, vpp: int = 1
    ) -> None:
        problems = []
        if (tp * dp) % (ep * etp):
            problems.append(
                f"ep({ep}) * etp({etp}) must divide tp({tp}) * dp({dp}) = {tp * dp} ranks per stage"
            )
        for name, v in (("tp", tp), ("pp", pp), ("dp", dp), ("ep", ep), ("etp", etp), ("vpp", vpp)):
            if v < 1:
                problems.append(f"{name} must be >= 1, got {v}")
        if problems:
            raise RefitError(problems)
        self.tp, self.pp, self.dp, self.ep, self.etp, self.vpp = tp, pp, dp, ep, etp, vpp
        self.edp = tp * dp // (ep * etp)

    @property
    def world(self) -> int:
        return self.tp * self.dp * self.pp

    def stage_ranks(self, stage: int) -> np.ndarray:
        n = self.tp * self.dp
        return np.arange(stage * n, (stage + 1) * n)

    def dense_mesh(self, stage: int) -> Mesh:
        return Mesh(self.stage_ranks(stage).reshape(self.dp, self.tp), ("dp", "tp"))

    def expert_mesh(self, stage: int) -> Mesh:
        return Mesh(
            self.stage_ranks(stage).reshape(self.edp, self.ep, self.etp), ("edp", "ep", "etp")
        )

    def __repr__(self) -> str:
        return (
            f"TP{self.tp} PP{self.pp}{f' VPP{self.vpp}' if self.vpp > 1 else ''} DP{self.dp} "
            f"EP{self.ep} ETP{self.etp} ({self.world} ranks)"
        )


def stage_of(p: HFParam, num_layers: int, par: MegatronParallel) -> int:
    if p.layer is None:
        return 0 if p.role == Role.EMBED else par.pp - 1
    chunks = par.pp * par.vpp
    return (p.layer * chunks // num_layers) % par.pp


def megatron_layout(p: HFParam, stage: int, par: MegatronParallel, *, te: bool = True) -> Layout:
    """`p`'s layout. MLA's down projections are replicated with Transformer Engine's layer
    spec (its linear layers there are "duplicated") and split on dim 0 over TP with the
    local spec (column-parallel layers), `te` says which."""
    if p.role in _EXPERTS:
        mesh = par.expert_mesh(stage)
        inter_dim = 2 if p.role == Role.EXPERT_DOWN else 1
        return Layout(mesh, [Replicate(), Shard(0), Shard(inter_dim)], p.shape)
    mesh = par.dense_mesh(stage)
    tp: Placement = Replicate()
    if p.role in _COLUMN or (not te and p.role in (Role.MLA_Q_A, Role.MLA_KV_A)):
        tp = Shard(0)
    elif p.role in (Role.OUT, Role.DOWN):
        tp = Shard(1)
    return Layout(mesh, [Replicate(), tp], p.shape)


def megatron_spec(
    config: Mapping[str, Any],
    par: MegatronParallel,
    *,
    dtype: torch.dtype = torch.bfloat16,
    te: bool = True,
) -> TrainerSpec:
    """What a Megatron trainer with parallelism `par` holds, from metadata only (with
    Transformer Engine's layer spec, or with the local spec: `te`)."""
    nl = config["num_hidden_layers"]
    params = []
    for p in hf_params(config):
        s = stage_of(p, nl, par)
        params.append(
            SourceParam(
                p.name, p.shape, hf_dtype(p, config, dtype), s, megatron_layout(p, s, par, te=te)
            )
        )
    return TrainerSpec(
        world=par.world,
        stage_ranks=tuple(tuple(int(r) for r in par.stage_ranks(s)) for s in range(par.pp)),
        params=tuple(params),
    )
