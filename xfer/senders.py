"""Who sends each chunk: the overlaps of source cells and destination boxes, and a sender
for every one of them (`xfer.plan` builds its chunk tables from these).

For each pair of (source geometry, destination geometry) a cached `template` lists every
non-empty overlap of a source cell with a destination box, in (cell, position) order; items
sharing a template are instantiated together with numpy (`pick_senders`), so the work grows
with the number of distinct geometries plus a vectorized pass over all chunks. A chunk whose
receiver holds its cell is a local copy; otherwise its sender is a replica of the cell,
preferring the receiver's node when nodes are known and rotating through the candidates so
that every replica sends an equal share. `Picked.chunks` then makes the chunk tables: the
local chunks, and the remote ones sorted by (sender, receiver, item, region), leaving out
the chunks of ranks that receive by relay instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from xfer.layout import Geometry, Placement, geometry
from xfer.relay import frozen

if TYPE_CHECKING:
    from xfer.plan import ReshardItem

__all__ = ["Chunks", "GeomKey", "Picked", "Template", "cat", "pick_senders", "template"]

# Chunk instances processed per numpy batch while planning (bounds temporary memory).
_BATCH = 1 << 20


@dataclass(frozen=True, eq=False)
class Chunks:
    """A table of chunks, one row each: item, sender, receiver, region ``[lo, hi)``, bytes.

    Regions are padded to the plan's widest dim count with ``[0, 1)`` so every row has the
    same width; `Plan.items[i].dst.ndim` says how many dims are real.
    """

    item: np.ndarray
    sender: np.ndarray
    receiver: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    nbytes: np.ndarray

    def __len__(self) -> int:
        return int(self.item.shape[0])

    def take(self, index: np.ndarray) -> Chunks:
        return Chunks(*(frozen(a[index]) for a in self._arrays()))

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return (self.item, self.sender, self.receiver, self.lo, self.hi, self.nbytes)


@dataclass(frozen=True, eq=False)
class Template:
    cell: np.ndarray  # [K] source cell of each overlap
    pos: np.ndarray  # [K] destination mesh position
    lo: np.ndarray  # [K, ndim]
    hi: np.ndarray  # [K, ndim]
    nelem: np.ndarray  # [K]


GeomKey = tuple[tuple[int, ...], tuple[Placement, ...], tuple[int, ...]]


@functools.lru_cache(maxsize=4096)
def template(src_key: GeomKey, dst_key: GeomKey) -> Template:
    """Every non-empty (source cell & destination box), ordered by (cell, position)."""
    sg, dg = geometry(*src_key), geometry(*dst_key)
    cells, pos, los, his = [], [], [], []
    # Loop over cells to bound memory at (positions x dims) per step.
    step = max(1, (1 << 22) // max(1, dg.starts.shape[0] * max(1, dg.starts.shape[1])))
    for c0 in range(0, sg.ncells, step):
        c1 = min(sg.ncells, c0 + step)
        lo = np.maximum(sg.cell_starts[c0:c1, None, :], dg.starts[None, :, :])
        hi = np.minimum(sg.cell_stops[c0:c1, None, :], dg.stops[None, :, :])
        ok = (hi > lo).all(axis=-1)
        u, j = np.nonzero(ok)
        cells.append(u + c0)
        pos.append(j)
        los.append(lo[u, j])
        his.append(hi[u, j])
    nd = len(src_key[2])
    lo_a = np.concatenate(los) if los else np.zeros((0, nd), np.int64)
    hi_a = np.concatenate(his) if his else np.zeros((0, nd), np.int64)
    return Template(
        cell=np.concatenate(cells) if cells else np.zeros(0, np.int64),
        pos=np.concatenate(pos) if pos else np.zeros(0, np.int64),
        lo=lo_a,
        hi=hi_a,
        nelem=np.prod(hi_a - lo_a, axis=1, dtype=np.int64),
    )


@dataclass(frozen=True, eq=False)
class _Part:
    """Chunks of a batch of items sharing a template: items `sel` in order, and per
    (item, template row) its sender and receiver."""

    tmpl: Template
    sel: np.ndarray
    itemsize: int
    sender: np.ndarray  # [T * K]
    receiver: np.ndarray  # [T * K]


@dataclass(frozen=True, eq=False)
class Picked:
    """Every chunk's sender, before the chunk table is built (so that relay can leave the
    followers' chunks out of it)."""

    parts: list[_Part]

    def loads(self, column: np.ndarray, ncols: int, world: int) -> tuple[np.ndarray, np.ndarray]:
        """Remote bytes per (sender, `column` of the receiver), and received per rank."""
        out = np.zeros(world * ncols, dtype=np.float64)
        into = np.zeros(world, dtype=np.float64)
        for p in self.parts:
            nb = (np.tile(p.tmpl.nelem, len(p.sel)) * p.itemsize).astype(np.float64)
            remote = p.sender != p.receiver
            s, r, w = p.sender[remote], p.receiver[remote], nb[remote]
            out += np.bincount(s * ncols + column[r], weights=w, minlength=world * ncols)
            into += np.bincount(r, weights=w, minlength=world)
        return out.reshape(world, ncols), into

    def chunks(self, width: int, fed: np.ndarray, world: int, nitems: int) -> tuple[Chunks, Chunks]:
        """The local chunks, and the remote ones sorted by (sender, receiver, item, region)
        without those the ranks in `fed` receive. Chunks are made in region order for each
        item and receiver (template rows run over cells in box order, and cells partition
        every dim, so their overlaps with one box keep that order): a stable sort by
        (sender, receiver, item) gives the pair order. Regions are filled in last, for the
        rows kept, in their final order."""
        keep = [np.nonzero(~fed[p.receiver] | (p.sender == p.receiver))[0] for p in self.parts]
        kept = list(zip(self.parts, keep, strict=True))
        base = np.cumsum([0] + [len(p.tmpl.cell) for p in self.parts])
        item = cat([p.sel[r // len(p.tmpl.cell)] for p, r in kept])
        sender = cat([p.sender[r] for p, r in kept]).astype(np.int64)
        receiver = cat([p.receiver[r] for p, r in kept]).astype(np.int64)
        # each kept row's template row among all parts' templates, and its item size
        trow = cat([base[i] + r % len(p.tmpl.cell) for i, (p, r) in enumerate(kept)])
        isz = cat([np.full(len(r), p.itemsize) for p, r in kept])
        lo_t = np.zeros((int(base[-1]), width), dtype=np.int64)
        hi_t = np.ones((int(base[-1]), width), dtype=np.int64)
        for i, p in enumerate(self.parts):
            nd = p.tmpl.lo.shape[1]
            lo_t[base[i] : base[i + 1], :nd] = p.tmpl.lo
            hi_t[base[i] : base[i + 1], :nd] = p.tmpl.hi
        nelem = cat([p.tmpl.nelem for p in self.parts])
        remote = sender != receiver
        rows = np.nonzero(remote)[0]
        if world * world * max(1, nitems) < 1 << 62:
            key = (sender[rows] * world + receiver[rows]) * max(1, nitems) + item[rows]
            rows = rows[np.argsort(key, kind="stable")]
        else:
            rows = rows[np.lexsort((item[rows], receiver[rows], sender[rows]))]

        def table(r: np.ndarray) -> Chunks:
            t = trow[r]
            return Chunks(
                *(
                    frozen(a)
                    for a in (item[r], sender[r], receiver[r], lo_t[t], hi_t[t], nelem[t] * isz[r])
                )
            )

        return table(np.nonzero(~remote)[0]), table(rows)


def cat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


def _rotate(
    sg: Geometry, tmpl: Template, src_ranks: np.ndarray, recv: np.ndarray, seq: np.ndarray
) -> np.ndarray:
    """Senders without node preference: the receiver itself where it holds the cell, else
    replica ``seq mod count`` of the cell's holders (``members`` lists them first)."""
    count = sg.member_count[tmpl.cell]  # [K]
    pos = sg.members[tmpl.cell[None, :], seq % count[None, :]]  # [T, K] mesh positions
    sender = np.take_along_axis(src_ranks, pos, axis=1)
    # the receiver's position in each item's source mesh (-1: none), found by a search in
    # the items' ranks sorted once (item t's keys offset by t * span), and whether it holds
    # the cell
    t, p = src_ranks.shape
    span = int(max(src_ranks.max(), recv.max())) + 1
    off = np.arange(t, dtype=np.int64)[:, None] * span
    flat = (src_ranks + off).ravel()
    order = np.argsort(flat, kind="stable")
    ordered = flat[order]
    want = (recv + off).ravel()
    at = np.minimum(np.searchsorted(ordered, want), len(ordered) - 1)
    rpos = np.where(ordered[at] == want, order[at] % p, -1).reshape(recv.shape)
    holds = (rpos >= 0) & (sg.cell_of[np.maximum(rpos, 0)] == tmpl.cell[None, :])
    return np.where(holds, recv, sender)


def pick_senders(items: tuple[ReshardItem, ...], nodes: tuple[int, ...] | None) -> Picked:
    """Instantiate templates for all items and choose a sender for every chunk."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, it in enumerate(items):
        key = (it.src.key, it.dst.key, it.itemsize)
        groups.setdefault(key, []).append(i)
    node_arr = None if nodes is None else np.asarray(nodes, dtype=np.int64)
    parts: list[_Part] = []
    counter = 0
    for (src_key, dst_key, itemsize), idxs in groups.items():
        tmpl = template(src_key, dst_key)
        k = len(tmpl.cell)
        if k == 0:
            continue
        sg = geometry(*src_key)  # type: ignore[misc]
        members = sg.members[tmpl.cell]  # [K, W] mesh positions, -1 padded
        mvalid = members >= 0
        members_c = np.where(mvalid, members, 0)
        step = max(1, _BATCH // (k * members.shape[1]))
        for t0 in range(0, len(idxs), step):
            sel = idxs[t0 : t0 + step]
            t = len(sel)
            src_ranks = np.array([items[i].src.mesh.flat for i in sel], dtype=np.int64)
            dst_ranks = np.array([items[i].dst.mesh.flat for i in sel], dtype=np.int64)
            recv = dst_ranks[:, tmpl.pos]  # [T, K]
            seq = counter + np.arange(t * k, dtype=np.int64).reshape(t, k)
            if node_arr is None:
                sender = _rotate(sg, tmpl, src_ranks, recv, seq)
            else:
                reps = src_ranks[:, members_c]  # [T, K, W]
                is_local = ((reps == recv[..., None]) & mvalid).any(axis=-1)
                cand = np.broadcast_to(mvalid, reps.shape)
                near = cand & (node_arr[reps] == node_arr[recv][..., None])
                cand = np.where(near.any(axis=-1, keepdims=True), near, cand)
                pick = seq % cand.sum(axis=-1)
                hit = (np.cumsum(cand, axis=-1) == (pick + 1)[..., None]) & cand
                col = hit.argmax(axis=-1)
                sender = np.take_along_axis(reps, col[..., None], axis=-1)[..., 0]
                sender = np.where(is_local, recv, sender)
            counter += t * k
            parts.append(
                _Part(
                    tmpl,
                    np.asarray(sel, dtype=np.int64),
                    int(itemsize),  # type: ignore[call-overload]
                    sender.reshape(-1).astype(np.int32),
                    recv.reshape(-1).astype(np.int32),
                )
            )
    return Picked(parts)
