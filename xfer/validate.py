"""Checks on this rank's local tensors, and the agreement that makes every rank fail together.

`check_locals` lists what is wrong with the tensors one rank passes for a list of items:
shapes, dtypes, devices, tensors that cannot be read or written as plain memory (``meta``,
conjugate or negative-bit views, destinations with stride 0), and memory that two items share
in a way that would corrupt data (a destination overlapping another destination, or any
item's source). Such problems are local (only that rank can see them), so before any data
moves the ranks run `agree`: every rank contributes its problems and the fingerprint of what
it is about to do, every rank gets every contribution, and every rank raises the same
`XferError` if anything is wrong anywhere (including ranks that built different plans, or
chose different paths, which would otherwise hang).

In the common case (no problems anywhere) the agreement costs one gather of an 18-byte
status per rank (a problem flag, an extra-data flag, a 16-byte digest) and one broadcast of
all statuses. Only when some rank reports something do the ranks exchange their full messages
(`exchange`: rank 0 gathers lengths, then payloads, then broadcasts the lengths and the
concatenation). Messages are JSON (`xfer.wire`), never pickles. Both use only the `Comm`
protocol, on the comm's device.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch

from xfer import wire
from xfer.comm import Comm, Transfer
from xfer.errors import XferError
from xfer.plan import ReshardItem
from xfer.segments import Local, Segments

__all__ = ["agree", "check_locals", "exchange"]


def check_locals(
    items: Sequence[ReshardItem],
    rank: int,
    srcs: Sequence[Local | None],
    dsts: Sequence[Local | None],
    *,
    sources: bool = True,
    destinations: bool = True,
) -> list[str]:
    """Every problem with the local tensors `rank` passes for `items` (`sources` /
    `destinations` False: that side may be None where the rank holds a box, as when it
    is written later)."""
    out: list[str] = []
    if len(srcs) != len(items) or len(dsts) != len(items):
        return [
            f"rank {rank}: {len(items)} items but {len(srcs)} source and {len(dsts)} "
            f"destination tensors"
        ]
    devices: dict[str, list[str]] = {}
    for i, it in enumerate(items):
        for side, lay, t in (("source", it.src, srcs[i]), ("destination", it.dst, dsts[i])):
            where = f"tensor {it.label!r} {side}"
            held = lay.holds(rank)
            if t is None:
                # None is fine outside the mesh and for an empty box (a 0-d box is one element)
                later = not (sources if side == "source" else destinations)
                if held and math.prod(lay.local_shape(rank)) > 0 and not later:
                    out.append(
                        f"{where}: rank {rank} is in {lay.mesh!r} and holds box "
                        f"{_fmt_bounds(lay.bounds(rank))} but passed no local tensor"
                    )
                continue
            if not isinstance(t, torch.Tensor | Segments):
                out.append(f"{where}: rank {rank} passed a {type(t).__name__}, not a tensor")
                continue
            if not held:
                out.append(
                    f"{where}: rank {rank} passed a local tensor {list(t.shape)} but is not "
                    f"in {lay.mesh!r}, so it holds no {side} box"
                )
                continue
            want = lay.local_shape(rank)
            if tuple(t.shape) != want:
                out.append(
                    f"{where}: rank {rank} local shape {list(t.shape)} is not its box "
                    f"{_fmt_bounds(lay.bounds(rank))} (shape {list(want)}) of {lay!r}"
                )
            if t.dtype != it.dtype:
                out.append(
                    f"{where}: rank {rank} local dtype {t.dtype} differs from the "
                    f"tensor's dtype {it.dtype}"
                )
            for part in _parts(t):
                why = _unusable(part, side)
                if why:
                    out.append(f"{where}: rank {rank}: {why}")
                    break
            devices.setdefault(str(t.device), []).append(f"{it.label!r} {side}")
    if len(devices) > 1:
        desc = "; ".join(f"{d}: {', '.join(v[:3])}" for d, v in devices.items())
        out.append(f"rank {rank}: local tensors are on several devices ({desc})")
    if not out:
        out += [f"rank {rank}: {p}" for p in _aliasing(items, srcs, dsts)]
    return out


def _parts(t: Local) -> list[torch.Tensor]:
    return list(t.parts) if isinstance(t, Segments) else [t]


def _unusable(t: torch.Tensor, side: str) -> str:
    if t.device.type == "meta":
        return "the local tensor is on the meta device (it has no data)"
    if t.is_conj() or t.is_neg():
        return (
            "the local tensor is a lazy conjugate/negative view; call resolve_conj() / "
            "resolve_neg() first"
        )
    if side == "destination" and any(
        s == 0 and n > 1 for s, n in zip(t.stride(), t.shape, strict=True)
    ):
        return (
            f"the destination has stride 0 (an expanded view of shape {list(t.shape)}, strides "
            f"{list(t.stride())}): several elements share memory"
        )
    return ""


# -- memory shared between items ---------------------------------------------------------------
def _bytes(t: torch.Tensor) -> tuple[int, int]:
    """(first byte, one past the last byte) of the memory `t` can touch."""
    start = t.data_ptr()
    span = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True) if n > 0)
    return start, start + (span + 1) * t.element_size()


def _extent(t: torch.Tensor) -> tuple[int, int, int]:
    """(storage id, first byte, one past the last byte) of the memory `t` can touch."""
    return (t.untyped_storage().data_ptr(), *_bytes(t))


def _box_in_base(t: torch.Tensor) -> tuple[tuple[int, int], ...] | None:
    """The element box `t` covers in the row-major base tensor its strides imply, when its
    strides are nested (each divides the one before, the last is 1); else None."""
    strides = t.stride()
    if not strides or strides[-1] != 1:
        return None
    if any(a % b for a, b in itertools.pairwise(strides) if b):
        return None
    if any(b == 0 for b in strides):
        return None
    rest = int(t.storage_offset())
    box = []
    for s, n in zip(strides, t.shape, strict=True):
        start, rest = divmod(rest, s)
        box.append((start, start + n))
    return tuple(box)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    sa, a0, a1 = _extent(a)
    sb, b0, b1 = _extent(b)
    if sa != sb or a1 <= b0 or b1 <= a0:
        return False
    if a.stride() == b.stride() and a.element_size() == b.element_size():
        ba, bb = _box_in_base(a), _box_in_base(b)
        if ba is not None and bb is not None:  # exact: boxes of one base tensor
            return all(x0 < y1 and y0 < x1 for (x0, x1), (y0, y1) in zip(ba, bb, strict=True))
    return True  # the byte ranges meet: assume the worst


def _aliasing(
    items: Sequence[ReshardItem], srcs: Sequence[Local | None], dsts: Sequence[Local | None]
) -> list[str]:
    """Destinations that overlap another destination, or a source of another item."""
    if not any(isinstance(d, torch.Tensor | Segments) for d in dsts):
        return []
    # (first byte, one past the last, side, item, view), each extent computed once
    views: list[tuple[int, int, str, int, torch.Tensor]] = []
    for i, (s, d) in enumerate(zip(srcs, dsts, strict=True)):
        for side, x in (("destination", d), ("source", s)):
            if isinstance(x, torch.Tensor | Segments):
                for p in _parts(x):
                    if p.numel():
                        views.append((*_bytes(p), side, i, p))
    views.sort(key=lambda v: (v[0], v[1]))
    out = []
    active: list[tuple[int, int, str, int, torch.Tensor]] = []
    for v in views:
        active = [a for a in active if a[1] > v[0]]
        for a in active:
            if "destination" not in (a[2], v[2]):
                continue
            if _overlap(a[4], v[4]):
                first, second = sorted([a, v], key=lambda z: z[3])
                out.append(
                    f"the {first[2]} of {items[first[3]].label!r} and the {second[2]} of "
                    f"{items[second[3]].label!r} share memory; a reshard would overwrite data "
                    "it still reads or writes twice"
                )
        active.append(v)
    return out[:20]


def _fmt_bounds(b: Sequence[tuple[int, int]] | None) -> str:
    if b is None:
        return "(none)"
    return "[" + ", ".join(f"{a}:{z}" for a, z in b) + "]"


# -- agreement -------------------------------------------------------------------------------------
def exchange(comm: Comm, payload: bytes) -> list[bytes]:
    """Every rank's `payload`, on every rank (an all-gather built from p2p + broadcast)."""
    n, rank, dev = comm.size, comm.rank, comm.device
    if n == 1:
        return [payload]
    mine = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(dev) if payload else None
    lens = torch.zeros(n, dtype=torch.int64, device=dev)
    if rank == 0:
        comm.send_recv([], [Transfer(p, lens[p : p + 1]) for p in range(1, n)]).wait()
        lens[0] = len(payload)
        sizes = lens.tolist()
        bufs = [torch.empty(s, dtype=torch.uint8, device=dev) for s in sizes]
        comm.send_recv([], [Transfer(p, bufs[p]) for p in range(1, n) if sizes[p]]).wait()
        if mine is not None:
            bufs[0].copy_(mine)
        comm.broadcast(lens, 0).wait()
        data = torch.cat(bufs)
        comm.broadcast(data, 0).wait()
    else:
        length = torch.tensor([len(payload)], dtype=torch.int64, device=dev)
        comm.send_recv([Transfer(0, length)], []).wait()
        if mine is not None:
            comm.send_recv([Transfer(0, mine)], []).wait()
        comm.broadcast(lens, 0).wait()
        sizes = lens.tolist()
        data = torch.empty(sum(sizes), dtype=torch.uint8, device=dev)
        comm.broadcast(data, 0).wait()
    raw = data.cpu().numpy().tobytes()
    out, at = [], 0
    for s in sizes:
        out.append(raw[at : at + s])
        at += s
    return out


def _statuses(comm: Comm, status: bytes) -> list[bytes]:
    """Every rank's fixed-size `status`: one grouped gather to rank 0, one broadcast."""
    n, width, dev = comm.size, len(status), comm.device
    table = torch.zeros((n, width), dtype=torch.uint8, device=dev)
    mine = torch.frombuffer(bytearray(status), dtype=torch.uint8).to(dev)
    if comm.rank == 0:
        table[0].copy_(mine)
        comm.send_recv([], [Transfer(p, table[p]) for p in range(1, n)]).wait()
    else:
        comm.send_recv([Transfer(0, mine)], []).wait()
    comm.broadcast(table, 0).wait()
    raw = table.cpu().numpy()
    return [bytes(raw[r].tobytes()) for r in range(n)]


def _decode(raw: bytes, rank: int) -> tuple[list[str], str, Any]:
    try:
        rec = wire.loads(raw, what=f"rank {rank}'s agreement record")
        probs = rec["problems"]
        fp = wire.as_str(rec["fingerprint"], "fingerprint")
        if not isinstance(probs, list) or not all(isinstance(p, str) for p in probs):
            raise wire.WireError("problems: expected a list of strings")
        return probs, fp, rec["extra"]
    except (wire.WireError, KeyError, TypeError) as e:
        return [f"rank {rank} sent an unreadable agreement record ({e})"], "?", None


def agree(comm: Comm, problems: Sequence[str], fingerprint: str, extra: Any = None) -> list[Any]:
    """Raise the same `XferError` on every rank if any rank has problems or a different
    fingerprint; otherwise return every rank's `extra` (JSON data), indexed by rank (None
    where a rank passed None, the cheap case)."""
    if comm.size == 1:
        if problems:
            raise XferError([p if p.startswith("rank 0") else f"rank 0: {p}" for p in problems])
        return [extra]
    digest = hashlib.sha256(fingerprint.encode()).digest()[:16]
    status = bytes([1 if problems else 0, 0 if extra is None else 1]) + digest
    statuses = _statuses(comm, status)
    if all(st[0] == 0 and st[1] == 0 and st[2:] == digest for st in statuses):
        return [None] * comm.size
    record = {"problems": list(problems), "fingerprint": fingerprint, "extra": extra}
    parts = exchange(comm, wire.dumps(record))
    decoded = [_decode(p, r) for r, p in enumerate(parts)]
    violations: list[str] = []
    for r, (probs, _, _) in enumerate(decoded):
        violations += [p if p.startswith(f"rank {r}") else f"rank {r}: {p}" for p in probs]
    prints: dict[str, list[int]] = {}
    for r, (_, fp, _) in enumerate(decoded):
        prints.setdefault(fp, []).append(r)
    if len(prints) > 1:
        groups = "; ".join(f"ranks {rs} built {fp}" for fp, rs in prints.items())
        violations.append(
            "ranks disagree on what to move (every rank must pass the same items, layouts, "
            f"options and path in the same order): {groups}"
        )
    if violations:
        raise XferError(violations)
    return [e for _, _, e in decoded]
