"""Hypothesis strategies for meshes, layouts and reshard items, shared by the xfer tests."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from xfer import Layout, Mesh, Replicate, ReshardItem, Shard

DTYPES = [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.int64]


@st.composite
def meshes(draw, world: int, max_axes: int = 3, ranks=None):
    """A mesh of 1..max_axes axes over a subset of range(world) (or exactly `ranks`)."""
    naxes = draw(st.integers(1, max_axes))
    if ranks is None:
        size_cap = world
        sizes = []
        for _ in range(naxes):
            n = draw(st.integers(1, max(1, min(3, size_cap))))
            sizes.append(n)
            size_cap //= n
        total = math.prod(sizes)
        ranks = draw(st.permutations(range(world)))[:total]
    else:
        total = len(ranks)
        sizes = [total] + [1] * (naxes - 1)
        sizes = draw(st.permutations(sizes))
    names = ["a", "b", "c"][:naxes]
    import numpy as np

    return Mesh(np.array(list(ranks)).reshape(sizes), names)


@st.composite
def layouts(draw, shape, world: int, ranks=None):
    mesh = draw(meshes(world, ranks=ranks))
    placements = []
    for _ in range(mesh.ndim):
        if shape and draw(st.booleans()):
            placements.append(Shard(draw(st.integers(0, len(shape) - 1))))
        else:
            placements.append(Replicate())
    return Layout(mesh, placements, shape)


@st.composite
def items(draw, world: int, dtypes=DTYPES, max_dim: int = 7, overlap: str | None = None):
    """An item whose source and destination meshes are disjoint, overlapping or identical
    rank sets (drawn unless `overlap` names one)."""
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.integers(0, max_dim)) for _ in range(ndim))
    kind = overlap or draw(st.sampled_from(["disjoint", "overlap", "same", "any"]))
    src = draw(layouts(shape, world))
    used = set(src.mesh.flat)
    if kind == "same":
        dst = draw(layouts(shape, world, ranks=draw(st.permutations(sorted(used)))))
    elif kind == "disjoint" and len(used) < world:
        free = [r for r in range(world) if r not in used]
        n = draw(st.integers(1, len(free)))
        dst = draw(layouts(shape, world, ranks=draw(st.permutations(free))[:n]))
    else:
        dst = draw(layouts(shape, world))
    dtype = draw(st.sampled_from(dtypes))
    return ReshardItem(src, dst, dtype, name=f"t{draw(st.integers(0, 10**6))}")


def full_tensor(shape, dtype, seed: int) -> torch.Tensor:
    """A deterministic full tensor of distinct-ish values in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int64:
        return torch.randint(-(2**40), 2**40, shape, generator=g, dtype=torch.int64)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    x = torch.randn(shape, generator=g) * 10
    return x.to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() == 0:
        return True
    from xfer.program import as_bytes

    return torch.equal(as_bytes(a.contiguous()), as_bytes(b.contiguous()))
