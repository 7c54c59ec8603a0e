"""Failures: ranks agree on them quickly, installs roll back, checksums catch corruption."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from harness.fault_report import CampaignReport, EngineSeen, ManyFailures, ReportedFailure
from harness.reports import read
from refit.watch import Failure, FailureBoard, RefitFailed
from tests.strategies import full_tensor, items
from xfer import (
    Layout,
    Mesh,
    Replicate,
    ReshardItem,
    Segments,
    Transfer,
    build_program,
    plan_reshard,
    tcp_store,
)
from xfer.checksum import Checksum, box_checksum, region_checksum, sent_checksums
from xfer.program import as_bytes, byte_shape


def _split_rows(t: torch.Tensor | None):
    """`t` as Segments of two separately allocated row blocks (tensors with rows only)."""
    if t is None or t.dim() == 0 or t.shape[0] < 2:
        return t
    h = t.shape[0] // 2
    return Segments([t[:h].clone(), t[h:].clone()])


_RELAYED = ReshardItem(  # two source replicas, three destination replicas: one relays
    Layout(Mesh([0, 1], ("a",)), [Replicate()], [5, 5]),
    Layout(Mesh([2, 3, 4], ("a",)), [Replicate()], [5, 5]),
    torch.float32,
    "t0",
)


@settings(max_examples=150, deadline=None)
@given(st.lists(items(8), min_size=1, max_size=3), st.sampled_from([64, 1 << 20]), st.booleans())
@example([_RELAYED], 64, False)
def test_senders_checksums_add_up_to_each_receivers_box(its, bucket, segments):
    plan = plan_reshard(its, bucket_bytes=bucket, world_size=8)
    fulls = [full_tensor(it.src.shape, it.dtype, i) for i, it in enumerate(its)]
    sent: dict[tuple[int, int], Checksum] = {}
    for r in range(8):
        srcs = [
            f[it.src.box(r)] if it.src.holds(r) else None for it, f in zip(its, fulls, strict=True)
        ]
        # a relay forwarder's sends are checked against what landed in its destination
        dsts = [
            f[it.dst.box(r)] if it.dst.holds(r) else None for it, f in zip(its, fulls, strict=True)
        ]
        if segments:
            srcs = [_split_rows(t) for t in srcs]
        for key, v in sent_checksums(plan, build_program(plan, r), srcs, dsts).items():
            sent[key] = sent.get(key, Checksum()) + v
    for r in range(8):
        for i, (it, f) in enumerate(zip(its, fulls, strict=True)):
            if not it.dst.holds(r):
                continue
            # what the rank gets from others plus what it copies from itself
            local = Checksum()
            if it.src.holds(r):
                prog = build_program(plan, r)
                for lc in prog.local:
                    if lc.item == i:
                        region = f[it.dst.box(r)][lc.dst_index]
                        origin = [a for a, _ in it.dst.bounds(r)]
                        start = [o + s.start for o, s in zip(origin, lc.dst_index, strict=True)]
                        if start:
                            start[-1] *= it.itemsize
                        local += region_checksum(
                            as_bytes(region.contiguous()),
                            start or [0],
                            byte_shape(it.src.shape, it.itemsize),
                        )
            box = f[it.dst.box(r)]
            want = box_checksum(box, it.dst, r)
            assert sent.get((i, r), Checksum()) + local == want
            assert box_checksum(_split_rows(box), it.dst, r) == want


def test_a_changed_byte_changes_the_checksum():
    from xfer import Layout, Mesh, Replicate

    t = torch.randn(16, 8)
    lay = Layout(Mesh([0], ("x",)), [Replicate()], (16, 8))
    before = box_checksum(t, lay, 0)
    t.view(torch.uint8).view(-1)[37] ^= 1
    assert box_checksum(t, lay, 0) != before
    # moved bytes change it too (positions are weighted)
    u = torch.randn(16, 8)
    v = u.clone()
    v[[0, 1]] = v[[1, 0]]
    assert box_checksum(u, lay, 0) != box_checksum(v, lay, 0)


def test_checksum_catches_swaps_at_any_distance_and_every_single_bit_flip():
    from xfer import Layout, Mesh, Replicate

    n = 3 * 65521 + 17
    lay = Layout(Mesh([0], ("x",)), [Replicate()], (n,))
    u = torch.randn(n)
    want = box_checksum(u, lay, 0)
    # blocks 65521 elements apart: the modulus of the position weights of a simpler checksum
    for a, b in ((0, 65521), (5, 5 + 2 * 65521), (100, 101), (7, n - 1)):
        v = u.clone()
        v[[a, b]] = v[[b, a]]
        assert box_checksum(v, lay, 0) != want, (a, b)
    raw = u.view(torch.uint8)
    for byte in (0, 1, 4 * 65521, raw.numel() - 1):
        for bit in range(8):
            w = raw.clone()
            w[byte] ^= 1 << bit
            assert box_checksum(w.view(torch.float32), lay, 0) != want, (byte, bit)


def blocked_until_told(comm, port, who_fails):
    """Rank 0 waits for a message that never comes; `who_fails` posts a failure."""
    from xfer import TorchComm

    store = tcp_store("127.0.0.1", port, is_master=False)
    board = FailureBoard(store, f"t{port}", b"secret")
    me = Failure(comm.rank, "trainer", "test", "")
    # the deadline is far: a rank that stops, stops because it read the board
    interrupt = board.interrupt(1, time.monotonic() + 600, me, lambda: "waiting")
    c = TorchComm.create(store, comm.rank, comm.size, prefix=f"g{port}", interrupt=interrupt)
    try:
        if comm.rank == who_fails:
            board.post(1, Failure(comm.rank, "trainer", "transfer", "RuntimeError: boom"))
            raise RefitFailed(1, board.read(1))
        c.send_recv([], [Transfer((comm.rank + 1) % comm.size, torch.zeros(4))]).wait()
    except RefitFailed as e:
        return e.note, [f.describe() for f in e.failures]
    finally:
        c.close()
    return None


def test_every_rank_stops_when_one_posts_a_failure(ranks):
    store = tcp_store("127.0.0.1", 0, is_master=True)
    out = ranks.run(blocked_until_told, 4, store.port, 2, timeout=60)
    for note, failures in out:
        assert note == ""  # not "deadline passed"
        assert failures == ["trainer rank 2 failed in transfer: RuntimeError: boom"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fault_campaign(tmp_path):
    """Every failure raises on every side quickly, and the next refit recovers."""
    report = tmp_path / "faults.json"
    proc = subprocess.run(
        [sys.executable, "-m", "harness.faults", "--timeout", "5", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=850,
    )
    assert report.exists(), proc.stderr[-4000:]
    campaign = read(CampaignReport, report)
    cases = {r.case: r for r in campaign.cases}
    extras = campaign.extras()
    assert len(cases) == 11 and len(extras) == 8
    for x in extras:
        why = x if not isinstance(x, ManyFailures) else (x.failed, x.grown)  # short to read
        assert x.passed and x.recovered, (x.case, why)
    hostile = campaign.hostile_store
    assert hostile is not None and hostile.ignored_by_ranks >= 3 and not hostile.code_ran
    killed = campaign.driver_killed
    assert killed is not None and killed.processes >= 3 and killed.left == 0  # none runs on
    leaks = campaign.many_failures
    assert leaks is not None and leaks.failed == 200
    for proc, before in leaks.before.items():  # growth is a leak; fewer is not
        after = leaks.after[proc]
        assert after.threads - before.threads <= 5, (proc, before, after)
        assert after.fds - before.fds <= 5, (proc, before, after)
    for name, r in cases.items():
        assert r.raised, name
        assert r.recovered, (name, r.recovery_error)
        assert r.status_recovered.alive and not r.status_recovered.stale, name
        if r.failures is not None:  # a refit that failed, not a description
            assert r.seconds_to_raise < 5 + 2, name
            assert set(r.sides_raised) == {"trainer", "engine"}, name
            st = r.status_after
            assert st is not None and (not st.alive or (st.stale and st.generate_refused)), name

    def first(name: str) -> ReportedFailure:
        failures = cases[name].failures
        assert failures, name
        return failures[0]

    raises = first("trainer rank raises during the transfer")
    assert (raises.rank, raises.role, raises.phase) == (1, "trainer", "transfer")
    assert cases["trainer rank stalls past the 5 s timeout"].seconds_to_raise >= 5

    def after(name: str) -> EngineSeen:
        st = cases[name].status_after
        assert st is not None, name
        return st

    assert after("engine fails before touching its running weights").rolled_back
    assert not after("engine fails after it started changing its running weights").rolled_back
    assert (
        "checksum mismatch"
        in first("trainer changes its weights during the refit (verify=True)").message
    )
    died = cases["trainer rank process dies during the transfer"].error
    assert "trainer rank 1: the rank's process died (ActorDiedError)" in died
    assert not after("engine process dies during the transfer").alive
    assert "precision mismatch" in cases["description: wrong dtype"].error
    assert (
        "trainer shape [127, 128] != engine shape [128, 128]"
        in cases["description: wrong shape"].error
    )
    assert "is missing on the trainer" in cases["description: an expert projection missing"].error
    assert (
        "parameters the engine does not hold"
        in cases["description: the trainer holds another model"].error
    )
