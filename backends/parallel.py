"""A trainer's parallel sizes, and the placement rules both trainer sides share.

`Parallel` is the one record of a trainer's parallelism (in the spirit of torchtitan's
``ParallelDims``): tensor (tp), context (cp), pipeline (pp, with vpp virtual stages per stage),
data (dp), expert (ep) and expert-tensor (etp) parallel sizes, validated once (one error
naming every violated factor), with the sizes derived from them (expert data parallel `edp`,
`world`). Megatron's metadata model (`backends.megatron.layout`), a live Megatron rank's
coordinates (`backends.megatron.map.Coords`), the torch trainer's layouts
(`backends.torch.trainer`) and the test harness's Megatron builder all read it.

Ranks follow Megatron's default order: tensor-parallel fastest, then data-parallel, then
pipeline stages (``rank = tp_rank + tp * (dp_rank + dp * pp_rank)``). Inside a stage, expert
layers use the same ranks as an ``(edp, ep, etp)`` mesh (expert-TP fastest), with
``edp * ep * etp == dp * tp``.

`TP_DIM` is the one role -> placement table: the tensor dim each role is split on over the
tensor-parallel axis (for routed experts, the expert-tensor-parallel axis), as Megatron and
torchtitan split them; routed experts (`EXPERTS`) are split on dim 0 over ep. `stage_of` is a
parameter's pipeline stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from refit.errors import RefitError
from refit.hf import HFParam, Role
from xfer import Mesh

__all__ = ["DENSE_AXES", "EXPERTS", "EXPERT_AXES", "TP_DIM", "Parallel", "stage_of"]

# mesh axes of the two meshes of a pipeline stage
DENSE_AXES = ("dp", "tp")
EXPERT_AXES = ("edp", "ep", "etp")

_COLUMN = (Role.EMBED, Role.LM_HEAD, Role.Q, Role.K, Role.V, Role.GATE, Role.UP)
_COLUMN += (Role.Q_BIAS, Role.K_BIAS, Role.V_BIAS, Role.MLA_Q_B, Role.MLA_Q, Role.MLA_KV_B)

# role -> the tensor dim split over the tensor-parallel axis (etp for routed experts): the
# vocab and column-parallel weights on dim 0, row-parallel weights on dim 1, routed experts
# (gate/up [E, I, H], down [E, H, I]) on their intermediate dim; other roles are replicated
TP_DIM: Mapping[Role, int] = MappingProxyType(
    {r: 0 for r in _COLUMN}
    | {Role.OUT: 1, Role.DOWN: 1, Role.EXPERT_GATE: 1, Role.EXPERT_UP: 1, Role.EXPERT_DOWN: 2}
)
# routed experts' roles: split on dim 0 (the expert) over ep
EXPERTS = frozenset({Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN})

_SIZES = ("tp", "cp", "pp", "dp", "ep", "etp", "vpp")


@dataclass(frozen=True, init=False, repr=False)
class Parallel:
    """The parallel sizes of one trainer: ``tp * cp * dp * pp`` ranks; experts use
    ``edp * ep * etp`` of each stage's ranks. `etp` defaults to `tp` (as in Megatron)."""

    tp: int
    cp: int
    pp: int
    dp: int
    ep: int
    etp: int
    vpp: int

    def __init__(
        self,
        *,
        tp: int = 1,
        cp: int = 1,
        pp: int = 1,
        dp: int = 1,
        ep: int = 1,
        etp: int | None = None,
        vpp: int = 1,
    ) -> None:
        etp = tp if etp is None else etp
        sizes = dict(tp=tp, cp=cp, pp=pp, dp=dp, ep=ep, etp=etp, vpp=vpp)
        problems = [f"{k} must be >= 1, got {v}" for k, v in sizes.items() if v < 1]
        if not problems and (tp * cp * dp) % (ep * etp):
            ranks = f"tp({tp}){f' * cp({cp})' if cp > 1 else ''} * dp({dp})"
            problems.append(
                f"ep({ep}) * etp({etp}) must divide {ranks} = {tp * cp * dp} ranks per stage"
            )
        if problems:
            raise RefitError(problems)
        for k, v in sizes.items():
            object.__setattr__(self, k, int(v))

    @property
    def edp(self) -> int:
        """Expert data parallel: the ranks of a stage that hold the same experts."""
        return self.tp * self.cp * self.dp // (self.ep * self.etp)

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    def size(self, axis: str) -> int:
        """The size of `axis` (any field, or ``edp``)."""
        if axis not in (*_SIZES, "edp"):
            raise RefitError(f"no parallel axis {axis!r} (known: {', '.join(_SIZES)}, edp)")
        return int(getattr(self, axis))

    def stage_ranks(self, stage: int) -> tuple[int, ...]:
        """The ranks of pipeline stage `stage`, in dense mesh order."""
        if self.cp != 1:
            raise RefitError(f"context parallel size {self.cp} is not supported")
        n = self.tp * self.dp
        return tuple(range(stage * n, (stage + 1) * n))

    def dense_mesh(self, stage: int) -> Mesh:
        return Mesh(np.reshape(self.stage_ranks(stage), (self.dp, self.tp)), DENSE_AXES)

    def expert_mesh(self, stage: int) -> Mesh:
        ranks = np.reshape(self.stage_ranks(stage), (self.edp, self.ep, self.etp))
        return Mesh(ranks, EXPERT_AXES)

    def __repr__(self) -> str:
        return (
            f"TP{self.tp}{f' CP{self.cp}' if self.cp > 1 else ''} PP{self.pp}"
            f"{f' VPP{self.vpp}' if self.vpp > 1 else ''} DP{self.dp} "
            f"EP{self.ep} ETP{self.etp} ({self.world} ranks)"
        )


def stage_of(p: HFParam, num_layers: int, pp: int, vpp: int = 1) -> int:
    """`p`'s pipeline stage when `num_layers` layers are split evenly over ``pp * vpp`` model
    chunks, chunk ``c`` on stage ``c % pp`` (interleaved virtual pipeline): the embedding on
    the first stage, everything else outside the layers (final norm, head) on the last."""
    if p.layer is None:
        return 0 if p.role == Role.EMBED else pp - 1
    chunks = pp * vpp
    return (p.layer * chunks // num_layers) % pp
