"""Checks on this rank's local tensors, and the agreement that makes every rank fail together.

`check_locals` lists what is wrong with the tensors one rank passes for a list of items. Such
problems are local (only that rank can see them), so before any data moves the ranks run
`agree`: every rank contributes its problems and the fingerprint of the plan it built, every
rank gets every contribution, and every rank raises the same `XferError` if anything is wrong
anywhere (including ranks that built different plans, which would otherwise hang).

In the common case (no problems anywhere) the agreement costs one gather of an 18-byte
status per rank (a problem flag, an extra-data flag, a 16-byte digest of the plan) and one
broadcast of all statuses. Only when some rank reports something do the ranks exchange their
full messages (`exchange`: rank 0 gathers lengths, then payloads, then broadcasts the
collection). Both use only the `Comm` protocol.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from collections.abc import Sequence
from typing import Any

import torch

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
) -> list[str]:
    """Every problem with the local tensors `rank` passes for `items`."""
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
                if held and math.prod(lay.local_shape(rank)) > 0:
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
            devices.setdefault(str(t.device), []).append(f"{it.label!r} {side}")
    if len(devices) > 1:
        desc = "; ".join(f"{d}: {', '.join(v[:3])}" for d, v in devices.items())
        out.append(f"rank {rank}: local tensors are on several devices ({desc})")
    return out


def _fmt_bounds(b: Sequence[tuple[int, int]] | None) -> str:
    if b is None:
        return "(none)"
    return "[" + ", ".join(f"{a}:{z}" for a, z in b) + "]"


def exchange(comm: Comm, payload: bytes, *, device: torch.device | None = None) -> list[bytes]:
    """Every rank's `payload`, on every rank (an all-gather built from p2p + broadcast)."""
    n, rank = comm.size, comm.rank
    if n == 1:
        return [payload]
    dev = device or getattr(comm, "device", None) or torch.device("cpu")
    mine = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(dev) if payload else None
    length = torch.tensor([len(payload)], dtype=torch.int64, device=dev)
    if rank == 0:
        lens = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(n)]
        comm.send_recv([], [Transfer(p, lens[p]) for p in range(1, n)]).wait()
        sizes = [len(payload)] + [int(t.item()) for t in lens[1:]]
        bufs = [torch.empty(s, dtype=torch.uint8, device=dev) for s in sizes]
        comm.send_recv([], [Transfer(p, bufs[p]) for p in range(1, n) if sizes[p]]).wait()
        parts = [payload] + [bytes(b.cpu().numpy().tobytes()) for b in bufs[1:]]
        blob = pickle.dumps(parts)
        total = torch.tensor([len(blob)], dtype=torch.int64, device=dev)
        comm.broadcast(total, 0).wait()
        data = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(dev)
        comm.broadcast(data, 0).wait()
        return parts
    comm.send_recv([Transfer(0, length)], []).wait()
    if mine is not None:
        comm.send_recv([Transfer(0, mine)], []).wait()
    total = torch.zeros(1, dtype=torch.int64, device=dev)
    comm.broadcast(total, 0).wait()
    data = torch.empty(int(total.item()), dtype=torch.uint8, device=dev)
    comm.broadcast(data, 0).wait()
    parts = pickle.loads(data.cpu().numpy().tobytes())
    return list(parts)


def _statuses(comm: Comm, status: bytes, dev: torch.device) -> list[bytes]:
    """Every rank's fixed-size `status`: one grouped gather to rank 0, one broadcast."""
    n, width = comm.size, len(status)
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


def agree(
    comm: Comm,
    problems: Sequence[str],
    fingerprint: str,
    extra: Any = None,
    *,
    device: torch.device | None = None,
) -> list[Any]:
    """Raise the same `XferError` on every rank if any rank has problems or a different
    fingerprint; otherwise return every rank's `extra`, indexed by rank (None where a rank
    passed None, the cheap case)."""
    if comm.size == 1:
        if problems:
            raise XferError([p if p.startswith("rank 0") else f"rank 0: {p}" for p in problems])
        return [extra]
    dev = device or getattr(comm, "device", None) or torch.device("cpu")
    digest = hashlib.sha256(fingerprint.encode()).digest()[:16]
    status = bytes([1 if problems else 0, 0 if extra is None else 1]) + digest
    statuses = _statuses(comm, status, dev)
    if all(st[0] == 0 and st[1] == 0 and st[2:] == digest for st in statuses):
        return [None] * comm.size
    parts = exchange(comm, pickle.dumps((list(problems), fingerprint, extra)), device=dev)
    decoded = [pickle.loads(p) for p in parts]
    violations: list[str] = []
    for r, (probs, _, _) in enumerate(decoded):
        violations += [p if p.startswith(f"rank {r}") else f"rank {r}: {p}" for p in probs]
    prints: dict[str, list[int]] = {}
    for r, (_, fp, _) in enumerate(decoded):
        prints.setdefault(fp, []).append(r)
    if len(prints) > 1:
        groups = "; ".join(f"ranks {rs} built {fp}" for fp, rs in prints.items())
        violations.append(
            "ranks disagree on what to move (every rank must pass the same items, layouts "
            f"and options in the same order): {groups}"
        )
    if violations:
        raise XferError(violations)
    return [e for _, _, e in decoded]
