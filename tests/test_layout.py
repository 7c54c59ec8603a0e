"""Layout and Mesh: boxes equal torch DTensor's own arithmetic; bad input is named clearly."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.tensor import Partial
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from tests.strategies import layouts
from xfer import Layout, Mesh, Replicate, Shard, XferError


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_boxes_match_dtensor(data):
    ndim = data.draw(st.integers(0, 3))
    shape = tuple(data.draw(st.integers(0, 9)) for _ in range(ndim))
    lay = data.draw(layouts(shape, world=12))
    for pos, rank in enumerate(lay.mesh.flat):
        coord = [int(c) for c in np.unravel_index(pos, lay.mesh.shape)]
        local, offset = _compute_local_shape_and_global_offset(
            list(shape), list(lay.mesh.shape), coord, lay.placements
        )
        bounds = lay.bounds(rank)
        assert tuple(local) == lay.local_shape(rank)
        # DTensor reports offset 0 for dims it leaves empty; compare where the box is non-empty
        for d, (a, b) in enumerate(bounds):
            assert b - a == local[d]
            if b > a:
                assert a == offset[d]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_cells_tile_the_tensor(data):
    ndim = data.draw(st.integers(1, 3))
    shape = tuple(data.draw(st.integers(0, 6)) for _ in range(ndim))
    lay = data.draw(layouts(shape, world=12))
    g = lay.geometry
    cover = torch.zeros(shape, dtype=torch.int64)
    for u in range(g.ncells):
        idx = tuple(slice(a, b) for a, b in zip(g.cell_starts[u], g.cell_stops[u], strict=True))
        cover[idx] += 1
        members = g.members[u][g.members[u] >= 0]
        assert len(members) == g.member_count[u]
        for m in members:
            assert (g.starts[m] == g.cell_starts[u]).all() and (g.stops[m] == g.cell_stops[u]).all()
    assert (cover == 1).all()


def test_nested_sharding_left_to_right():
    mesh = Mesh([[0, 1], [2, 3]], ("a", "b"))
    lay = Layout(mesh, [Shard(0), Shard(0)], [7])
    # torch.chunk(7, 2) -> 4, 3; then each piece in 2 -> (2, 2), (2, 1)
    assert [lay.bounds(r) for r in range(4)] == [((0, 2),), ((2, 4),), ((4, 6),), ((6, 7),)]


def test_uneven_and_empty_shards():
    lay = Layout(Mesh([0, 1, 2, 3], ("tp",)), [Shard(1)], [2, 5])
    assert [lay.local_shape(r) for r in range(4)] == [(2, 2), (2, 2), (2, 1), (2, 0)]
    assert lay.box(3) == (slice(0, 2), slice(5, 5))


def test_outside_rank_has_empty_box():
    lay = Layout(Mesh([0, 1], ("tp",)), [Shard(0)], [4, 4])
    assert not lay.holds(5)
    assert lay.bounds(5) is None
    assert lay.box(5) == (slice(0, 0), slice(0, 0))
    assert torch.zeros(4, 4)[lay.box(5)].numel() == 0


def test_values_pickle_and_hash():
    lay = Layout(Mesh([[0, 1], [2, 3]], ("dp", "tp")), [Replicate(), Shard(-1)], [4, 6])
    assert lay.placements == (Replicate(), Shard(1))
    again = pickle.loads(pickle.dumps(lay))
    assert again == lay and hash(again) == hash(lay)
    assert repr(lay) == "Layout([4, 6] on Mesh(dp=2, tp=2; ranks 0..3) as (R, S(1)))"


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda: Mesh([0, 1, 1], ("tp",)), "Mesh ranks repeat: [1]"),
        (lambda: Mesh([[0, 1]], ("tp",)), "2 axes (1, 2) but 1 names"),
        (lambda: Mesh([0, -1], ("tp",)), "must be >= 0"),
        (lambda: Layout(Mesh([0, 1], ("tp",)), [Shard(2)], [4, 4]), "Shard(2) on axis 'tp'"),
        (lambda: Layout(Mesh([0, 1], ("tp",)), [Partial()], [4]), "is not supported"),
        (lambda: Layout(Mesh([0, 1], ("tp",)), [], [4]), "needs 1 placements"),
        (lambda: Layout(Mesh([0, 1], ("tp",)), [Replicate()], [-1]), "negative size"),
        (lambda: Mesh([0.0, 1.5], ("tp",)), "Mesh ranks must be integers"),
        (lambda: Mesh([True, False], ("tp",)), "Mesh ranks must be integers"),
        (lambda: Layout(Mesh([0, 1], ("tp",)), [Replicate()], [4.7]), "sequence of ints"),
    ],
)
def test_bad_input_is_named(build, needle):
    with pytest.raises(XferError) as e:
        build()
    assert needle in str(e.value)


def test_all_violations_in_one_error():
    with pytest.raises(XferError) as e:
        Layout(Mesh([[0, 1], [2, 3]], ("dp", "tp")), [Shard(5), Partial()], [4])
    assert len(e.value.violations) == 2
