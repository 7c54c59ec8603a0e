"""`backends.parallel`: the one record of a trainer's parallel sizes and the shared rules."""

from __future__ import annotations

import pytest

from backends.parallel import TP_DIM, Parallel, stage_of
from refit.errors import RefitError
from refit.hf import HFParam, Role


def test_sizes_are_validated_together_and_derived():
    par = Parallel(tp=2, pp=2, dp=4, ep=4, etp=1)
    assert (par.world, par.edp) == (16, 2)
    assert par.stage_ranks(1) == tuple(range(8, 16))
    assert par.dense_mesh(1).shape == (4, 2) and par.expert_mesh(1).shape == (2, 4, 1)
    assert repr(par) == "TP2 PP2 DP4 EP4 ETP1 (16 ranks)"
    assert Parallel(tp=4).etp == 4  # Megatron's default: etp = tp
    with pytest.raises(RefitError) as e:
        Parallel(tp=2, dp=1, ep=4, etp=1)
    assert "ep(4) * etp(1) must divide tp(2) * dp(1) = 2 ranks per stage" in str(e.value)
    with pytest.raises(RefitError) as e:
        Parallel(tp=0, vpp=0)
    assert "tp must be >= 1" in str(e.value) and "vpp must be >= 1" in str(e.value)


def test_stage_of_follows_roles_and_virtual_stages():
    embed = HFParam("model.embed_tokens.weight", (8, 4), Role.EMBED)
    norm = HFParam("model.norm.weight", (4,), Role.NORM)
    layers = [HFParam(f"model.layers.{i}.mlp.up_proj.weight", (8, 4), Role.UP, i) for i in range(8)]
    assert (stage_of(embed, 8, 4), stage_of(norm, 8, 4)) == (0, 3)
    assert [stage_of(p, 8, 2) for p in layers] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [stage_of(p, 8, 2, vpp=2) for p in layers] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert TP_DIM[Role.EXPERT_DOWN] == 2 and Role.NORM not in TP_DIM
