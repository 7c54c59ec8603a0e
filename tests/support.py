"""Helpers shared by the test modules (tests import this, never each other)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import torch

from xfer import Segments, build_program
from xfer.execute import _directs, _Locals, _pack, _recv_buffers, _unpack
from xfer.segments import copy_in

WORLD = 8  # ranks of the session's rank pool


def local_view(shape, dtype, mode: str, fill=None):
    """A local shard of `shape` laid out as `mode`: contiguous, padded (strided rows),
    transposed (last dim not unit-stride) or segments (separately allocated row blocks of
    uneven height, odd ones padded, as a `Segments`)."""
    if mode == "segments" and len(shape) >= 1 and shape[0] > 0:
        cuts = [0, *sorted({(shape[0] * k) // 3 for k in (1, 2)} - {0, shape[0]}), shape[0]]
        parts = [
            local_view((b - a, *shape[1:]), dtype, "padded" if i % 2 else "contiguous")
            for i, (a, b) in enumerate(itertools.pairwise(cuts))
        ]
        seg = Segments(parts)
        if fill is not None:
            copy_in(seg, tuple(slice(0, n) for n in shape), fill)
        return seg
    if mode == "padded" and shape:
        big = torch.zeros([n + 2 for n in shape], dtype=dtype)
        t = big[tuple(slice(1, 1 + n) for n in shape)]
    elif mode == "transposed" and len(shape) >= 2:
        t = torch.zeros(tuple(reversed(shape)), dtype=dtype).permute(*reversed(range(len(shape))))
    else:
        t = torch.zeros(shape, dtype=dtype)
    if fill is not None:
        t.copy_(fill)
    return t


def fresh_dsts(its, rank, mode):
    return [
        local_view(it.dst.local_shape(rank), it.dtype, mode) if it.dst.holds(rank) else None
        for it in its
    ]


def local_inputs(its, rank, fulls, device="cpu"):
    srcs, dsts = [], []
    for it, full in zip(its, fulls, strict=True):
        srcs.append(full[it.src.box(rank)].to(device) if it.src.holds(rank) else None)
        dsts.append(
            torch.zeros(it.dst.local_shape(rank), dtype=it.dtype, device=device)
            if it.dst.holds(rank)
            else None
        )
    return srcs, dsts


def apply_plan(plan, fulls, device="cpu"):
    """Run every rank's program in-process; return each rank's destination tensors."""
    world = plan.world_size
    progs = [build_program(plan, r) for r in range(world)]
    state = [local_inputs(plan.items, r, fulls, device) for r in range(world)]
    locs = [_Locals(*state[r]) for r in range(world)]
    wire: dict[tuple[int, int, int], torch.Tensor] = {}
    for r, prog in enumerate(progs):
        for lc in prog.local:
            locs[r].dst[lc.item][lc.dst_index].copy_(locs[r].src[lc.item][lc.src_index])
        for rnd in prog.rounds:
            direct = _directs(rnd.sends, locs[r].src_bytes)
            buf = torch.zeros(direct.staged, dtype=torch.uint8, device=device)
            for m, out in zip(rnd.sends, _pack(rnd, direct, buf, locs[r]), strict=True):
                wire[(rnd.index, r, m.peer)] = out.clone()
    for r, prog in enumerate(progs):
        for rnd in prog.rounds:
            direct = _directs(rnd.recvs, locs[r].dst_bytes)
            buf = torch.zeros(direct.staged, dtype=torch.uint8, device=device)
            into = _recv_buffers(rnd, direct, buf)
            for m, b in zip(rnd.recvs, into, strict=True):
                b.copy_(wire.pop((rnd.index, m.peer, r)))
            _unpack(rnd, direct, into, locs[r])
    assert not wire, f"messages nobody received: {sorted(wire)[:5]}"
    for loc in locs:
        loc.finish()
    return [s[1] for s in state], progs


def scenario(workdir: Path, *args: str, timeout: float = 420) -> dict:
    out = workdir / f"report-{abs(hash(args))}.json"
    # every refit runs strict: each rank is held to NCCL's completion and ordering rules
    cmd = [sys.executable, "-m", "backends.scenario", "--workdir", str(workdir), "--json", str(out)]
    cmd.append("--strict")
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)
    if not out.exists():
        raise AssertionError(
            f"scenario {args} produced no report:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    report = json.loads(out.read_text())
    report["returncode"] = proc.returncode
    return report
