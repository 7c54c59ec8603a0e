"""`Segments`: row blocks read and written as one shard, without a copy of the whole."""

from __future__ import annotations

import pytest
import torch

from xfer import Segments, XferError
from xfer.segments import copy_in, copy_out


def test_regions_across_part_boundaries_read_and_write_the_parts():
    a, b, c = torch.arange(12.0).view(3, 4), torch.arange(12.0, 16).view(1, 4), torch.zeros(2, 4)
    seg = Segments([a, b, c])
    assert seg.shape == (6, 4) and seg.numel() == 24 and seg.dim() == 2
    whole = torch.cat([a, b, c])
    index = (slice(2, 5), slice(1, 3))
    out = torch.empty(3, 2)
    copy_out(seg, index, out)
    assert torch.equal(out, whole[index])
    copy_in(seg, index, -out)
    assert torch.equal(a[2, 1:3], -whole[2, 1:3]) and torch.equal(b[0, 1:3], -whole[3, 1:3])
    assert torch.equal(c[0, 1:3], -whole[4, 1:3]) and torch.equal(c[1], whole[5])
    assert [(off, t.shape[0]) for off, t in seg.pieces(slice(1, 6))] == [(0, 2), (2, 1), (3, 2)]


def test_parts_must_agree():
    with pytest.raises(XferError, match=r"parts \[1\]"):
        Segments([torch.zeros(2, 4), torch.zeros(2, 3)])
    with pytest.raises(XferError, match=r"parts \[1\]"):
        Segments([torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bfloat16)])
    with pytest.raises(XferError, match="at least one"):
        Segments([])
