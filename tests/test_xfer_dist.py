"""Multi-process gloo tests: p2p == golden == slicing the full tensor, bit for bit; the wire
carries exactly what the plan says; bad input raises the same error on every rank."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from harness.local import RankError
from tests.strategies import full_tensor, items, same_bits
from tests.support import WORLD, fresh_dsts, local_view
from xfer import (
    DTensorRef,
    Layout,
    Mesh,
    RecordingComm,
    Replicate,
    Resharder,
    ReshardItem,
    Shard,
    XferError,
    build_program,
    plan_reshard,
    xferdtensor,
)


def _locals(its, rank, seeds, mode):
    fulls = [full_tensor(it.src.shape, it.dtype, s) for it, s in zip(its, seeds, strict=True)]
    srcs = [
        local_view(it.src.local_shape(rank), it.dtype, mode, f[it.src.box(rank)])
        if it.src.holds(rank)
        else None
        for it, f in zip(its, fulls, strict=True)
    ]
    return fulls, srcs


def run_paths(comm, its, seeds, bucket, mode, relay=None):
    """Golden and p2p on the same inputs; report equality and what went over the wire."""
    rank = comm.rank
    fulls, srcs = _locals(its, rank, seeds, mode)
    out = {}
    for path in ("golden", "p2p"):
        rec = RecordingComm(comm)
        resharder = Resharder(its, rec, bucket_bytes=bucket, relay=relay)
        dsts = fresh_dsts(its, rank, mode)
        stats = resharder.run(srcs, dsts, path=path)
        verified = resharder.verify(srcs, dsts) if path == "p2p" else []
        dsts_seen = [None if d is None else d.contiguous() for d in dsts]
        ok = [
            d is None or same_bits(d, f[it.dst.box(rank)])
            for it, d, f in zip(its, dsts_seen, fulls, strict=True)
        ]
        prog = resharder.program
        out[path] = {
            "ok": ok,
            "dsts": dsts_seen,
            "groups": rec.record.groups,
            "broadcasts": rec.record.broadcasts,
            "stats": stats,
            "rounds": [
                ([(m.peer, m.nbytes) for m in r.sends], [(m.peer, m.nbytes) for m in r.recvs])
                for r in prog.rounds
            ],
            "plan_in": int(resharder.plan.stats.bytes_in[rank]),
            "plan_out": int(resharder.plan.stats.bytes_out[rank]),
            "verified": verified,
            "relay": len(resharder.plan.relay),
        }
    # sources are untouched by either path
    _, again = _locals(its, rank, seeds, mode)
    out["src_intact"] = all(
        (a is None) or same_bits(a.contiguous(), b.contiguous())
        for a, b in zip(srcs, again, strict=True)
    )
    return out


def check_run(results, its):
    for rank, res in enumerate(results):
        assert res["src_intact"], rank
        for path in ("golden", "p2p"):
            assert all(res[path]["ok"]), (rank, path, res[path]["ok"])
        for a, b in zip(res["golden"]["dsts"], res["p2p"]["dsts"], strict=True):
            assert (a is None and b is None) or same_bits(a, b)
        p2p = res["p2p"]
        assert p2p["verified"] == [], (rank, p2p["verified"])
        n = len(p2p["rounds"])
        data = p2p["groups"][len(p2p["groups"]) - n - 1 : -1]  # the last: verify's exchange
        control = p2p["groups"][: len(p2p["groups"]) - n - 1]
        # the data rounds are exactly the program's, the rest is agreement traffic with rank 0
        assert [tuple(g) for g in data] == [tuple(r) for r in p2p["rounds"]]
        for sends, recvs in control:
            assert all(peer == 0 for peer, _ in sends) and (rank == 0 or not recvs)
        sent = sum(b for sends, _ in data for _, b in sends)
        recv = sum(b for _, recvs in data for _, b in recvs)
        assert sent == p2p["plan_out"] == p2p["stats"].bytes_sent
        assert recv == p2p["plan_in"] == p2p["stats"].bytes_received
        # the agreement is one gather of 18-byte statuses and one broadcast of all of them
        world = len(results)
        assert p2p["broadcasts"] == [(0, 18 * world)]
        assert control == (
            [([], [(p, 18) for p in range(1, world)])] if rank == 0 else [([(0, 18)], [])]
        )
        # golden broadcasts every non-empty source cell once (after the agreement)
        cells = [
            (it.src.mesh.flat[int(g.members[u, 0])], int(n) * it.itemsize)
            for it in its
            for g in [it.src.geometry]
            for u, n in enumerate(g.cell_numel())
            if n
        ]
        assert res["golden"]["broadcasts"][1:] == cells


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    its=st.lists(items(WORLD), min_size=1, max_size=3),
    bucket=st.sampled_from([48, 256, 1 << 20]),
    mode=st.sampled_from(["contiguous", "padded", "transposed", "segments"]),
)
def test_random_layouts_p2p_equals_golden_equals_slicing(ranks, its, bucket, mode):
    seeds = list(range(len(its)))
    check_run(ranks.run(run_paths, WORLD, its, seeds, bucket, mode), its)


@pytest.mark.parametrize("mode", ["contiguous", "padded", "transposed", "segments"])
def test_many_tensors_one_plan(ranks, mode):
    """(dp2, tp2) -> (tp4) plus assorted layouts and dtypes, 40 tensors, small buckets."""
    train = Mesh([[0, 1], [2, 3]], ("dp", "tp"))
    infer = Mesh([4, 5, 6, 7], ("tp",))
    both = Mesh([[0, 1, 2, 3], [4, 5, 6, 7]], ("dp", "tp"))
    its = []
    for i in range(40):
        dtype = [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.int64][i % 4]
        shape = (16 + i % 5, 12 + i % 3)
        if i % 3 == 0:
            src = Layout(train, [Replicate(), Shard(0)], shape)
            dst = Layout(infer, [Shard(1)], shape)
        elif i % 3 == 1:
            src = Layout(train, [Shard(1), Shard(0)], shape)
            dst = Layout(both, [Replicate(), Shard(0)], shape)
        else:
            src = Layout(both, [Shard(0), Shard(1)], shape)
            dst = Layout(train, [Replicate(), Replicate()], shape)
        its.append(ReshardItem(src, dst, dtype, f"w{i}"))
    results = ranks.run(run_paths, WORLD, its, list(range(40)), 2048, mode)
    check_run(results, its)
    rounds = len(results[4]["p2p"]["rounds"])
    assert rounds > 1  # the small bucket forces several rounds


def test_scalars_bools_and_empty_shards(ranks):
    m4 = Mesh([0, 1, 2, 3], ("tp",))
    m2 = Mesh([6, 7], ("dp",))
    its = [
        ReshardItem(Layout(m4, [Replicate()], []), Layout(m2, [Replicate()], []), torch.float32),
        ReshardItem(Layout(m4, [Shard(0)], [3]), Layout(m2, [Shard(0)], [3]), torch.bool),
        ReshardItem(Layout(m4, [Shard(1)], [2, 0]), Layout(m2, [Shard(0)], [2, 0]), torch.int64),
    ]
    check_run(ranks.run(run_paths, WORLD, its, [1, 2, 3], 1 << 20, "contiguous"), its)


# -- the one-tensor API, layouts learned from the ranks that hold them -----------------------
def one_tensor(comm, path):
    src = Layout(Mesh([[0, 1], [2, 3]], ("dp", "tp")), [Replicate(), Shard(0)], [10, 6])
    dst = Layout(Mesh([2, 3, 4, 5, 6, 7], ("tp",)), [Shard(1)], [10, 6])
    full = full_tensor((10, 6), torch.bfloat16, 7)
    r = comm.rank
    s = DTensorRef(full[src.box(r)].clone(), src) if src.holds(r) else None
    d = (
        DTensorRef(torch.zeros(dst.local_shape(r), dtype=torch.bfloat16), dst)
        if dst.holds(r)
        else None
    )
    stats = xferdtensor(s, d, comm, path=path)
    return d is None or torch.equal(d.local, full[dst.box(r)]), stats.path


@pytest.mark.parametrize("path", ["golden", "p2p", "auto"])
def test_xferdtensor_with_sides_missing(ranks, path):
    out = ranks.run(one_tensor, WORLD, path)
    assert all(ok for ok, _ in out)
    assert {p for _, p in out} == {"golden" if path == "golden" else "p2p"}


# -- bad input: every rank raises the same error, before any data moves ---------------------
_TRAIN = Layout(Mesh([0, 1], ("tp",)), [Shard(0)], [8, 4])
_INFER = Layout(Mesh([2, 3], ("tp",)), [Shard(1)], [8, 4])


def bad_input(comm, case, path="p2p"):
    rank = comm.rank
    its = [ReshardItem(_TRAIN, _INFER, torch.float32, "layers.0.w")]
    src = torch.zeros(4, 4) if rank in (0, 1) else None
    dst = torch.zeros(8, 2) if rank in (2, 3) else None
    srcs, dsts = [src], [dst]
    if case == "shape" and rank == 1:
        src = torch.zeros(3, 4)
    elif case == "dtype" and rank == 2:
        dst = torch.zeros(8, 2, dtype=torch.float64)
    elif case == "src_on_non_holder" and rank == 3:
        src = torch.zeros(4, 4)
    elif case == "missing_local" and rank == 0:
        src = None
    elif case == "different_plans" and rank == 3:
        its = [ReshardItem(_TRAIN, _INFER, torch.bfloat16, "layers.0.w")]
        dst = torch.zeros(8, 2, dtype=torch.bfloat16)
    elif case == "rank_outside":
        bad = Layout(Mesh([2, 7], ("tp",)), [Shard(1)], [8, 4])
        its = [ReshardItem(_TRAIN, bad, torch.float32, "layers.0.w")]
    elif case == "meta" and rank == 2:
        dst = torch.zeros(8, 2, device="meta")
    elif case == "conj" and rank == 0:
        src = torch.zeros(4, 4, dtype=torch.complex64).conj()
        its = [ReshardItem(_TRAIN, _INFER, torch.complex64, "layers.0.w")]
        dst = None
    elif case == "conj":
        its = [ReshardItem(_TRAIN, _INFER, torch.complex64, "layers.0.w")]
        src = torch.zeros(4, 4, dtype=torch.complex64) if rank == 1 else None
        dst = torch.zeros(8, 2, dtype=torch.complex64) if rank in (2, 3) else None
    elif case == "expanded" and rank == 3:
        dst = torch.zeros(8, 1).expand(8, 2)
    elif case == "same_dst":
        # two tensors received into one buffer
        its = [*its, ReshardItem(_TRAIN, _INFER, torch.float32, "layers.1.w")]
        srcs, dsts = [src, None if src is None else src.clone()], [dst, dst]
    elif case in ("alias", "twice"):
        # a second tensor whose destination (alias) or source (twice) is the first one's memory
        other = ReshardItem(_INFER, _TRAIN, torch.float32, "layers.1.w")
        its = [*its, other]
        if case == "alias":
            back = None if src is None else src  # rank 0/1: writes layers.1.w into w's source
            srcs, dsts = [src, dst], [dst, back]
        else:
            shared = torch.zeros(8, 2) if rank in (2, 3) else None
            srcs, dsts = [src, shared], [shared, None if src is None else torch.zeros(4, 4)]
    elif case == "path" and rank == 3:
        path = "golden"
    if case not in ("alias", "twice", "same_dst"):
        srcs, dsts = [src], [dst]
    rec = RecordingComm(comm)
    try:
        Resharder(its, rec).run(srcs, dsts, path=path)
    except XferError as e:
        # nothing but the agreement exchange went over the wire
        data = [
            g for g in rec.record.groups if any(p != 0 for p, _ in g[0]) or (g[1] and rank != 0)
        ]
        return str(e), data
    return None, None


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        (
            "shape",
            "rank 1: tensor 'layers.0.w' source: rank 1 local shape [3, 4] is not its box [4:8, 0:4]",
        ),
        ("dtype", "rank 2 local dtype torch.float64 differs from the tensor's dtype torch.float32"),
        (
            "src_on_non_holder",
            "rank 3 passed a local tensor [4, 4] but is not in Mesh(tp=2; ranks 0..1)",
        ),
        (
            "missing_local",
            "rank 0 is in Mesh(tp=2; ranks 0..1) and holds box [0:4, 0:4] but passed no local tensor",
        ),
        ("different_plans", "ranks disagree on what to move"),
        ("rank_outside", "has ranks [7] outside the communicator of size 4"),
        ("meta", "rank 2: the local tensor is on the meta device"),
        ("conj", "rank 0: the local tensor is a lazy conjugate/negative view"),
        ("expanded", "rank 3: the destination has stride 0"),
        ("alias", "the source of 'layers.0.w' and the destination of 'layers.1.w' share memory"),
        ("twice", "the destination of 'layers.0.w' and the source of 'layers.1.w' share memory"),
        ("same_dst", "the destination of 'layers.0.w' and the destination of 'layers.1.w'"),
        ("path", "ranks disagree on what to move"),
    ],
)
@pytest.mark.parametrize("path", ["p2p", "golden", "auto"])
def test_bad_input_raises_on_every_rank(ranks, case, needle, path):
    if case == "path" and path == "golden":
        pytest.skip("the case is one rank on golden while the others are not")
    out = ranks.run(bad_input, 4, case, path, timeout=60)
    messages = {msg for msg, _ in out}
    assert len(messages) == 1, messages  # every rank raised the same error
    (msg,) = messages
    assert msg is not None and needle in msg, msg
    assert all(not data for _, data in out)


def agreement_on_good_input(comm, path):
    rank = comm.rank
    its = [ReshardItem(_TRAIN, _INFER, torch.float32, "layers.0.w")]
    src = torch.zeros(4, 4) if rank in (0, 1) else None
    dst = torch.zeros(8, 2) if rank in (2, 3) else None
    rec = RecordingComm(comm)
    Resharder(its, rec).run([src], [dst], path=path)
    return rec.record.groups[0], rec.record.broadcasts[0]


@pytest.mark.parametrize("path", ["p2p", "golden", "auto"])
def test_good_input_costs_one_18_byte_status_per_rank_on_every_path(ranks, path):
    # on gloo, m2n cannot apply: auto must not gather per-item reasons
    for rank, (group, bcast) in enumerate(ranks.run(agreement_on_good_input, 4, path)):
        sends, recvs = group
        assert (sends, recvs) == (
            ([], [(1, 18), (2, 18), (3, 18)]) if rank == 0 else ([(0, 18)], [])
        )
        assert bcast == (0, 4 * 18)  # then the table of statuses, once


def disagree_layouts(comm):
    r = comm.rank
    # rank 1 believes the source is sharded on dim 1; the others on dim 0
    src = Layout(Mesh([0, 1], ("tp",)), [Shard(1 if r == 1 else 0)], [4, 4])
    dst = Layout(Mesh([2, 3], ("tp",)), [Replicate()], [4, 4])
    s = DTensorRef(torch.zeros(src.local_shape(r)), src) if src.holds(r) else None
    d = DTensorRef(torch.zeros(4, 4), dst) if dst.holds(r) else None
    try:
        xferdtensor(s, d, comm)
    except XferError as e:
        return str(e)
    return None


def test_ranks_that_disagree_on_a_layout_all_raise(ranks):
    out = ranks.run(disagree_layouts, 4, timeout=60)
    assert len(set(out)) == 1 and out[0] is not None
    assert "ranks disagree on the source layout" in out[0] and "ranks [1]" in out[0]


def test_worker_error_surfaces(ranks):
    with pytest.raises(RankError):
        ranks.run(disagree_layouts_raises, 2)


def disagree_layouts_raises(comm):
    raise RuntimeError(f"rank {comm.rank} fails on purpose")


def verified(comm, its, seeds, corrupt_rank):
    rank = comm.rank
    _, srcs = _locals(its, rank, seeds, "contiguous")
    rs = Resharder(its, comm, bucket_bytes=64)
    dsts = fresh_dsts(its, rank, "contiguous")
    rs.run(srcs, dsts, path="p2p")
    if rank == corrupt_rank:
        for d in dsts:
            if d is not None and d.numel():
                d.view(-1).view(torch.uint8)[0] ^= 1
                break
    return rs.verify(srcs, dsts)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(its=st.lists(items(4), min_size=1, max_size=3))
@example(  # two replicas of a destination and no source there: the plan relays
    its=[
        ReshardItem(
            Layout(Mesh([1], ("a",)), [Replicate()], (2, 3, 5)),
            Layout(Mesh([0, 2], ("a",)), [Replicate()], (2, 3, 5)),
            torch.float32,
            "t0",
        )
    ]
)
def test_verify_matches_what_senders_sent_and_catches_a_flipped_bit(ranks, its):
    seeds = list(range(len(its)))
    clean = ranks.run(verified, 4, its, seeds, -1)
    assert clean == [[], [], [], []]  # local copies included
    holders = [r for r in range(4) if any(it.dst.holds(r) and math.prod(it.dst.local_shape(r))
                                          for it in its)]  # fmt: skip
    if holders:
        bad = ranks.run(verified, 4, its, seeds, holders[0])
        flagged = {r for r in range(4) if bad[r]}
        # a relay forwarder's checksums of what it forwarded are read where those bytes
        # landed in its own destination (`xfer.checksum.sent_checksums`): its corrupted box
        # may also be reported by the replicas it feeds, directly or down the chain, and by
        # no other rank
        plan = plan_reshard(its, world_size=4, bucket_bytes=64)
        feeds = {
            r: {m.peer for rnd in build_program(plan, r).rounds for m in rnd.sends if m.forward}
            for r in range(4)
        }
        downstream, todo = set(), [holders[0]]
        while todo:
            for peer in feeds[todo.pop()] - downstream:
                downstream.add(peer)
                todo.append(peer)
        assert holders[0] in flagged and flagged - {holders[0]} <= downstream, (flagged, feeds)


def row_sharded(comm, mode):
    src_l = Layout(Mesh([0, 1], ("tp",)), [Shard(0)], (16, 8))
    dst_l = Layout(Mesh([2, 3, 4, 5], ("tp",)), [Shard(0)], (16, 8))
    its = [ReshardItem(src_l, dst_l, torch.float32, "rows")]
    fulls, srcs = _locals(its, comm.rank, [3], mode)
    dsts = fresh_dsts(its, comm.rank, mode)
    stats = Resharder(its, comm).run(srcs, dsts, path="p2p")
    ok = dsts[0] is None or same_bits(dsts[0].contiguous(), fulls[0][dst_l.box(comm.rank)])
    return ok, stats.packed_bytes, stats.unpacked_bytes, stats.bytes_sent, stats.bytes_received


def test_contiguous_regions_go_straight_from_and_into_storage(ranks):
    out = ranks.run(row_sharded, 6, "contiguous")
    assert all(ok for ok, *_ in out)
    assert sum(b[3] for b in out) == 16 * 8 * 4  # every byte sent once ...
    assert all(packed == unpacked == 0 for _, packed, unpacked, _, _ in out)  # ... no copies
    # strided on both sides (padded rows): every message is staged, on each side
    out = ranks.run(row_sharded, 6, "padded")
    assert all(ok for ok, *_ in out)
    assert sum(b[1] for b in out) == sum(b[2] for b in out) == 16 * 8 * 4


def mixed_sizes(comm, part_bytes):
    # rank 0 holds small and large tensors, ranks 1 and 2 their row halves: a pair's stream
    # has 512 B halves among 8 B ones; `part_bytes` 256 cuts the large halves out
    shapes = [(2, 2), (16, 16), (2, 2), (2, 2), (16, 16), (2, 2)]
    its = [
        ReshardItem(
            Layout(Mesh([0], ("a",)), [Replicate()], shape),
            Layout(Mesh([1, 2], ("tp",)), [Shard(0)], shape),
            torch.float32,
            f"t{i}",
        )
        for i, shape in enumerate(shapes)
    ]
    fulls, srcs = _locals(its, comm.rank, list(range(len(its))), "contiguous")
    dsts = fresh_dsts(its, comm.rank, "contiguous")
    rec = RecordingComm(comm)
    stats = Resharder(its, rec, bucket_bytes=1 << 20, part_bytes=part_bytes).run(
        srcs, dsts, path="p2p"
    )
    golden = fresh_dsts(its, comm.rank, "contiguous")
    Resharder(its, comm, bucket_bytes=1 << 20).run(srcs, golden, path="golden")
    ok = all(
        d is None or (same_bits(d, f[it.dst.box(comm.rank)]) and same_bits(d, g))
        for it, d, g, f in zip(its, dsts, golden, fulls, strict=True)
    )
    sizes = [n for sends, _ in rec.record.groups for _, n in sends]
    return ok, stats.packed_bytes, stats.unpacked_bytes, stats.messages_sent, sizes


def test_a_large_tensor_travels_alone_straight_from_and_into_storage(ranks):
    # one message per receiver: it spans six tensors, so every byte is packed and unpacked
    out = ranks.run(mixed_sizes, 3, 0)
    assert all(ok for ok, *_ in out)
    assert out[0][3] == 2 and out[0][4] == 2 * [4 * 8 + 2 * 512]
    assert out[0][1] == 2 * (4 * 8 + 2 * 512) and out[1][2] == out[2][2] == 4 * 8 + 2 * 512
    # parts: per receiver [small] [large] [small small] [large] [small], each large half and
    # each lone small one straight from and into storage; only [small small] is staged
    out = ranks.run(mixed_sizes, 3, 256)
    assert all(ok for ok, *_ in out)
    assert out[0][3] == 2 * 5 and out[0][4] == 2 * [8, 512, 16, 512, 8]
    assert out[0][1] == 2 * 16 and out[1][2] == out[2][2] == 16


@pytest.mark.parametrize(
    ("relay", "mode"),
    [(1, "contiguous"), (1, "padded"), (2, "segments"), (None, "contiguous"), (False, "padded")],
)
def test_relay_feeds_replicas_from_each_other(ranks, relay, mode):
    """Two trainer ranks, three engine replicas of TP2: with relay the sources send one
    replica's worth; the others forward it (from their receive staging, a round after it
    arrived), bit for bit, checked by golden, slicing and the checksums."""
    src = Layout(Mesh([0, 1], ("tp",)), [Shard(0)], [24, 40])
    dst = Layout(Mesh([[2, 3], [4, 5], [6, 7]], ("dp", "tp")), [Replicate(), Shard(1)], [24, 40])
    dtypes = [torch.float32, torch.bfloat16, torch.int8, torch.float32]
    its = [ReshardItem(src, dst, dt, f"w{i}") for i, dt in enumerate(dtypes)]
    res = ranks.run(run_paths, WORLD, its, [1, 2, 3, 4], 512, mode, relay)
    check_run(res, its)
    one_replica = sum(24 * 40 * dt.itemsize for dt in dtypes)
    sent_by_sources = res[0]["p2p"]["plan_out"] + res[1]["p2p"]["plan_out"]
    chains = {1: 1, 2: 2, None: 1, False: 3}[relay]  # auto: one chain is fewest rounds here
    assert sent_by_sources == chains * one_replica
    assert [r["p2p"]["relay"] for r in res] == [2 * (3 - chains)] * WORLD  # followers
    assert all(r["p2p"]["plan_in"] == one_replica // 2 for r in res[2:])


def forward_around_a_gap(comm):
    """Rank 0 sends rank 1 a row in rounds 0 and 2 (nothing in round 1); rank 1 forwards
    each to rank 2 in the round after. Round 2 receives into the buffer round 1 forwards
    from: posted before round 1 is done, it would overwrite what is still on the wire."""
    from xfer.execute import run_p2p
    from xfer.program import Copy, Message, RankProgram, Round

    def msg(peer, row, forward=False):
        copy = Copy(0, (slice(row, row + 1), slice(0, 64)), (1, 64), 0, 64)
        return Message(peer, 0, 64, (copy,), forward)

    full = torch.arange(128, dtype=torch.uint8).reshape(2, 64)
    rounds = {
        0: (Round(0, (msg(1, 0),), ()), Round(2, (msg(1, 1),), ())),
        1: (
            Round(0, (), (msg(0, 0),)),
            Round(1, (msg(2, 0, True),), ()),
            Round(2, (), (msg(0, 1),)),
            Round(3, (msg(2, 1, True),), ()),
        ),
        2: (Round(1, (), (msg(1, 0),)), Round(3, (), (msg(1, 1),))),
    }[comm.rank]
    src = full.clone() if comm.rank == 0 else None
    dst = None if comm.rank == 0 else torch.zeros(2, 64, dtype=torch.uint8)
    stats = run_p2p(RankProgram(comm.rank, rounds, ()), [src], [dst], comm)
    return dst is None or same_bits(dst, full), stats.packed_bytes, stats.unpacked_bytes


def test_a_forwarding_rank_never_receives_into_the_buffer_on_the_wire(ranks):
    # every rank runs under the strict comm: a receive posted into a buffer whose forward is
    # still in flight changes that send buffer, which is reported
    out = ranks.run(forward_around_a_gap, 3)
    assert [ok for ok, *_ in out] == [True, True, True]
    # the forwarder unpacks both rows (received staged) and packs nothing; the others copy
    # nothing (contiguous rows go straight from and into storage)
    assert [(p, u) for _, p, u in out] == [(0, 0), (0, 128), (0, 0)]
