"""Helpers shared by the test modules (tests import this, never each other)."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from harness.reports import LayoutReport, MegatronReport, ScenarioReport, read
from xfer import Segments, build_program
from xfer.execute import round_directs
from xfer.segments import copy_in
from xfer.staging import Locals, pack, recv_buffers, unpack

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
    """Run every rank's program in-process, round after round (a relay send forwards its
    rank's receive staging of the round before); return each rank's destination tensors."""
    world = plan.world_size
    progs = [build_program(plan, r) for r in range(world)]
    state = [local_inputs(plan.items, r, fulls, device) for r in range(world)]
    locs = [Locals(*state[r]) for r in range(world)]
    for r, prog in enumerate(progs):
        for lc in prog.local:
            locs[r].dst[lc.item][lc.dst_index].copy_(locs[r].src[lc.item][lc.src_index])
    directs = [round_directs(progs[r], locs[r].src_bytes, locs[r].dst_bytes) for r in range(world)]
    by_round = [{rnd.index: i for i, rnd in enumerate(prog.rounds)} for prog in progs]
    staged: list[torch.Tensor | None] = [None] * world  # each rank's last receive staging
    for index in range(plan.rounds):
        wire: dict[tuple[int, int], list[torch.Tensor]] = {}
        for r in range(world):
            i = by_round[r].get(index)
            if i is None:
                continue
            rnd, direct = progs[r].rounds[i], directs[r][0][i]
            buf = torch.zeros(direct.staged, dtype=torch.uint8, device=device)
            out = pack(rnd, direct, buf, locs[r], forwarded=staged[r])
            for m, b in zip(rnd.sends, out, strict=True):
                wire.setdefault((r, m.peer), []).append(b.clone())
        for r in range(world):
            i = by_round[r].get(index)
            staged[r] = None
            if i is None:
                continue
            rnd, direct = progs[r].rounds[i], directs[r][1][i]
            buf = torch.zeros(direct.staged, dtype=torch.uint8, device=device)
            into = recv_buffers(rnd, direct, buf)
            for m, b in zip(rnd.recvs, into, strict=True):
                b.copy_(wire[(m.peer, r)].pop(0))
            unpack(rnd, direct, into, locs[r])
            staged[r] = buf
        left = sorted(k for k, v in wire.items() if v)
        assert not left, f"round {index}: messages nobody received: {left[:5]}"
    for loc in locs:
        loc.finish()
    return [s[1] for s in state], progs


def scenario(workdir: Path, *args: str, timeout: float = 420) -> Any:
    """`python -m harness.scenario` with `args` (and ``--strict``): its report, as a
    `ScenarioReport` (`MegatronReport` with ``--trainer megatron``) with the exit status."""
    out = workdir / f"report-{abs(hash(args))}.json"
    # every refit runs strict: each rank is held to NCCL's completion and ordering rules
    cmd = [sys.executable, "-m", "harness.scenario", "--workdir", str(workdir), "--json", str(out)]
    cmd.append("--strict")
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)
    if not out.exists():
        raise AssertionError(
            f"scenario {args} produced no report:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    megatron = "--trainer" in args and args[args.index("--trainer") + 1] == "megatron"
    report = read(MegatronReport if megatron else ScenarioReport, out)
    return dataclasses.replace(report, returncode=proc.returncode)


def assert_good(report: ScenarioReport, steps: int) -> None:
    # before any refit, the engines generate what HF does (and fill their prefix caches)
    assert all(map(all, report.initial_tokens_equal)), report.initial_tokens_equal
    assert len(report.steps) == steps
    for s in report.steps:
        assert s.received_differs == [[]] * len(s.received_differs), s.received_differs
        assert s.state_differs == [[]] * len(s.state_differs), s.state_differs
        assert s.captured_tensors > 0
        assert all(all(row) for row in s.tokens_equal), s.tokens_equal
        assert s.max_logprob_diff <= 1e-4
        assert s.hf_changed  # the refit had something to do
        assert s.bulk_bytes > 0
    assert report.ok and report.returncode == 0


def check_megatron(
    report: MegatronReport, layouts: list[str], steps: int = 2
) -> dict[str, LayoutReport]:
    assert all(map(all, report.initial_tokens_equal)), report.initial_tokens_equal
    by = {lay.layout: lay for lay in report.layouts}
    assert list(by) == layouts
    for name, lay in by.items():
        assert lay.error is None, (name, lay.error)
        assert lay.init_logits_diff is not None and lay.init_logits_max is not None, name
        assert lay.init_logits_diff <= 1e-5 and lay.init_logits_max > 0.1, name
        if "vocab" not in name:  # the metadata model knows only the default vocab padding
            assert lay.metadata_spec_equal, name
        assert len(lay.steps) == steps, name
        for s in lay.steps:
            assert s.export_differs == [], (name, s.export_differs)
            assert s.logits_diff is not None and s.logits_diff <= 1e-5, (name, s.logits_diff)
            assert not any(s.received_differs) and not any(s.state_differs), name
            assert s.captured_tensors > 0 and s.bulk_bytes > 0, name
            assert all(all(row) for row in s.tokens_equal), (name, s.tokens_equal)
            assert s.max_logprob_diff <= 1e-4, name
            assert s.hf_changed, name
        assert lay.ok, name
    assert report.ok and report.returncode == 0
    return by


def listeners(port: int) -> set[str]:
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if int(p, 16) == port and state == "0A":  # LISTEN
                out.add(addr)
    return out
