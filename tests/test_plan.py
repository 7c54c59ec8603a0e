"""Pure planner tests: applying the plan rebuilds every destination; the wire is minimal.

No communication: each rank's program is applied in-process with the executors' own pack and
unpack code, the "wire" being a dict of byte buffers keyed by (round, sender, receiver).
"""

from __future__ import annotations

import pickle
from collections import defaultdict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.strategies import full_tensor, items, same_bits
from tests.support import apply_plan
from xfer import Layout, Mesh, Replicate, ReshardItem, Shard, XferError, build_program, plan_reshard
from xfer.program import split_range
from xfer.relay import replica_classes

WORLD = 8


def needed_remote_bytes(it: ReshardItem, rank: int) -> int:
    """Brute force: bytes of rank's destination box not in a source cell it holds."""
    b = it.dst.bounds(rank)
    if b is None:
        return 0
    shape = tuple(z - a for a, z in b)
    if 0 in shape:
        return 0
    held = torch.zeros(it.src.shape, dtype=torch.bool)
    if it.src.holds(rank):
        held[it.src.box(rank)] = True
    mine = held[tuple(slice(a, z) for a, z in b)]
    return int((~mine).sum()) * it.itemsize


@settings(max_examples=250, deadline=None)
@given(
    st.lists(items(WORLD), min_size=1, max_size=4),
    st.sampled_from([16, 64, 1 << 20]),
    st.sampled_from([None, 0, 8, 64]),
)
def test_plan_rebuilds_every_destination(its, bucket, part):
    plan = plan_reshard(its, bucket_bytes=bucket, world_size=WORLD, part_bytes=part)
    fulls = [full_tensor(it.src.shape, it.dtype, seed=i) for i, it in enumerate(its)]
    dsts, progs = apply_plan(plan, fulls)
    for r in range(WORLD):
        for i, it in enumerate(its):
            if it.dst.holds(r):
                assert same_bits(dsts[r][i], fulls[i][it.dst.box(r)]), (r, it)
    stats = plan.stats
    for r in range(WORLD):
        need = sum(needed_remote_bytes(it, r) for it in its)
        assert stats.bytes_in[r] == need == progs[r].bytes_received
        assert stats.bytes_out[r] == progs[r].bytes_sent
    big = (plan.chunks.nbytes >= plan.part_bytes) & (plan.part_bytes > 0)  # cut out as parts
    for prog in progs:
        for rnd in prog.rounds:
            # one message per pair per round (relay included) but for the parts a large
            # chunk makes (at most two cuts each), and the cap holds both ways
            for msgs, me, column in ((rnd.sends, "sender", "receiver"), (rnd.recvs, "receiver", "sender")):  # fmt: skip
                for peer in {m.peer for m in msgs}:
                    theirs = (getattr(plan.chunks, me) == prog.rank) & (
                        getattr(plan.chunks, column) == peer
                    )
                    cuts = 2 * int((big & theirs).sum())
                    assert sum(m.peer == peer for m in msgs) <= 1 + cuts
            assert rnd.send_bytes <= bucket and rnd.recv_bytes <= bucket
    assert stats.messages == sum(len(r.sends) for p in progs for r in p.rounds)
    assert stats.peak_recv_round.max(initial=0) <= bucket


def test_one_message_per_pair_when_it_fits():
    src = Layout(Mesh([[0, 1], [2, 3]], ("dp", "tp")), [Replicate(), Shard(0)], [8, 8])
    dst = Layout(Mesh([4, 5, 6, 7], ("tp",)), [Shard(1)], [8, 8])
    its = [ReshardItem(src, dst, torch.float32, f"w{i}") for i in range(10)]
    plan = plan_reshard(its, bucket_bytes=1 << 20)
    assert plan.rounds == 1
    # each destination needs 4 rows x 2 cols from each tp cell; 10 tensors coalesce
    assert plan.stats.messages == len(plan.pairs) <= 4 * 4
    assert all(plan.stats.bytes_in[4:] == 10 * 8 * 2 * 4)


def test_replicas_share_the_sending():
    # a tensor replicated on 4 ranks, sharded 8 ways on 8 other ranks
    src = Layout(Mesh([0, 1, 2, 3], ("dp",)), [Replicate()], [64, 16])
    dst = Layout(Mesh(list(range(4, 12)), ("tp",)), [Shard(0)], [64, 16])
    plan = plan_reshard([ReshardItem(src, dst, torch.bfloat16, "w")] * 3)
    out = plan.stats.bytes_out[:4]
    assert out.min() > 0 and out.max() - out.min() <= 8 * 16 * 2


def test_prefers_senders_on_the_receivers_node():
    src = Layout(Mesh([0, 1, 2, 3], ("dp",)), [Replicate()], [16, 4])
    dst = Layout(Mesh([4, 5, 6, 7], ("tp",)), [Shard(0)], [16, 4])
    nodes = [0, 1, 2, 3, 3, 2, 1, 0]  # receiver 4 shares node 3 with rank 3, ...
    plan = plan_reshard([ReshardItem(src, dst, torch.float32, "w")], node_of=nodes)
    c = plan.chunks
    assert all(nodes[s] == nodes[r] for s, r in zip(c.sender, c.receiver, strict=True))
    assert sorted(c.sender.tolist()) == [0, 1, 2, 3]


def test_local_regions_become_local_copies():
    mesh = Mesh([0, 1, 2, 3], ("tp",))
    src = Layout(mesh, [Shard(0)], [8, 8])
    dst = Layout(Mesh([[0, 1], [2, 3]], ("a", "b")), [Shard(0), Replicate()], [8, 8])
    plan = plan_reshard([ReshardItem(src, dst, torch.float32, "w")])
    # rank 0 needs rows 0:4 and holds 0:2, rank 1 needs 0:4 and holds 2:4, ...
    assert plan.stats.total_local_bytes == 4 * 2 * 8 * 4
    assert plan.stats.remote_bytes == 4 * 2 * 8 * 4


def test_identical_layouts_move_nothing_remote():
    lay = Layout(Mesh([[0, 1], [2, 3]], ("dp", "tp")), [Replicate(), Shard(1)], [6, 6])
    plan = plan_reshard([ReshardItem(lay, lay, torch.float32, "w")])
    assert plan.stats.remote_bytes == 0 and plan.rounds == 0
    assert plan.stats.total_local_bytes == 4 * 6 * 3 * 4


def test_plan_is_a_picklable_deterministic_value():
    src = Layout(Mesh([[0, 1], [2, 3]], ("dp", "tp")), [Replicate(), Shard(0)], [9, 5])
    dst = Layout(Mesh([2, 3, 4], ("tp",)), [Shard(1)], [9, 5])
    its = [ReshardItem(src, dst, torch.bfloat16, "a"), ReshardItem(dst, src, torch.int64, "b")]
    p1 = plan_reshard(its, bucket_bytes=64)
    p2 = pickle.loads(pickle.dumps(plan_reshard(its, bucket_bytes=64)))
    assert p1.fingerprint == p2.fingerprint
    for r in range(5):
        assert build_program(p1, r) == build_program(p2, r)
    with pytest.raises(ValueError):
        p1.chunks.nbytes[0] = 1  # read-only arrays
    assert plan_reshard(its, bucket_bytes=128).fingerprint != p1.fingerprint
    assert plan_reshard(its, bucket_bytes=64, part_bytes=0).fingerprint != p1.fingerprint


def test_bad_items_raise_one_error():
    a = Layout(Mesh([0, 1], ("tp",)), [Shard(0)], [4, 4])
    b = Layout(Mesh([2, 9], ("tp",)), [Shard(0)], [4, 5])
    with pytest.raises(XferError) as e:
        plan_reshard([ReshardItem(a, b, torch.float32, "w")], world_size=4, bucket_bytes=0)
    text = str(e.value)
    assert "global shapes differ: source [4, 4]" in text
    assert "ranks [9] outside the communicator of size 4" in text
    assert "bucket_bytes must be a positive int" in text
    with pytest.raises(
        XferError,
        match=r"part_bytes must be None \(bucket / 64\) or an int >= 0 \(0: never cut\), got -1",
    ):
        plan_reshard([ReshardItem(a, a, torch.float32, "w")], part_bytes=-1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.data())
def test_split_range_covers_exactly(shape, data):
    n = int(np.prod(shape))
    a = data.draw(st.integers(0, n))
    b = data.draw(st.integers(a, n))
    marks = torch.zeros(shape, dtype=torch.int64)
    boxes = split_range(tuple(shape), a, b)
    assert len(boxes) <= 2 * len(shape) - 1
    flat_seen = []
    for box in boxes:
        idx = tuple(slice(s, e) for s, e in box)
        marks[idx] += 1
        flat_seen += torch.arange(n).reshape(shape)[idx].reshape(-1).tolist()
    assert flat_seen == list(range(a, b))  # in order, no gaps
    assert int(marks.sum()) == b - a and int(marks.max()) <= 1


def test_rounds_spread_large_pairs():
    src = Layout(Mesh([0, 1], ("tp",)), [Shard(0)], [64, 64])
    dst = Layout(Mesh([2, 3], ("tp",)), [Shard(1)], [64, 64])
    plan = plan_reshard([ReshardItem(src, dst, torch.float32, "w")], bucket_bytes=4096)
    # each receiver gets 32x32 fp32 (4 KiB) from each of 2 senders: 8 KiB / 4 KiB = 2 rounds
    assert plan.rounds >= 2
    # both pairs of a receiver send in every round: all senders stay busy
    assert all(int(m) == plan.rounds for m in plan.pairs.messages)
    per_round = defaultdict(int)
    for r in (2, 3):
        for rnd in build_program(plan, r).rounds:
            per_round[(r, rnd.index)] += rnd.recv_bytes
    assert max(per_round.values()) <= 4096


def test_relay_chains_replicas_and_auto_picks_fewest_rounds():
    src = Layout(Mesh([0, 1], ("tp",)), [Shard(0)], [64, 32])
    dst = Layout(Mesh([[2, 3], [4, 5], [6, 7], [8, 9]], ("dp", "tp")), [Replicate(), Shard(1)],
                 [64, 32])  # fmt: skip
    its = [ReshardItem(src, dst, torch.float32, f"w{i}") for i in range(5)]
    one_replica = 64 * 32 * 4 * 5
    off = plan_reshard(its, bucket_bytes=512, relay=False)
    auto = plan_reshard(its, bucket_bytes=512)
    two = plan_reshard(its, bucket_bytes=512, relay=2)
    # without relay each source rank sends its half to 4 replicas: 80 KiB at 512 B a round
    assert len(off.relay) == 0 and off.rounds == off.direct_rounds == 160
    # auto: one chain per TP position (2 x 3 followers), 40 direct rounds + 1 per hop
    assert len(auto.relay) == 6 and auto.relay.max_depth == 3
    assert auto.direct_rounds == 40 and auto.rounds == 43
    assert two.relay.max_depth == 1 and two.rounds == two.direct_rounds + 1
    for plan, chains in ((off, 4), (auto, 1), (two, 2)):
        stats = plan.stats
        assert stats.bytes_out[:2].sum() == chains * one_replica
        assert (stats.bytes_in[2:10] == one_replica // 2).all()
        assert stats.relay_bytes == (4 - chains) * one_replica
        assert stats.peak_send_round.max() <= 512 and stats.peak_recv_round.max() <= 512
        fulls = [full_tensor(it.src.shape, it.dtype, seed=i) for i, it in enumerate(its)]
        dsts, progs = apply_plan(plan, fulls)
        for r in range(2, 10):
            for i, it in enumerate(its):
                assert same_bits(dsts[r][i], fulls[i][it.dst.box(r)])
        assert stats.messages == sum(len(r.sends) for p in progs for r in p.rounds)
    # the follower at depth k hears from the member before it, k rounds after its head
    assert auto.relay.follower.tolist() == [4, 5, 6, 7, 8, 9]
    assert auto.relay.forwarder.tolist() == [2, 3, 4, 5, 6, 7]
    assert auto.relay.head.tolist() == [2, 3, 2, 3, 2, 3]
    assert auto.relay.depth.tolist() == [1, 1, 2, 2, 3, 3]
    # one round of everything: a relay could only add rounds
    assert len(plan_reshard(its, bucket_bytes=1 << 20).relay) == 0
    for bad in (0, -1, 1.5, "on"):
        with pytest.raises(XferError, match="relay must be None"):
            plan_reshard(its, relay=bad)
    # ranks that also hold a source box are never relayed; nor are different boxes
    mixed = Layout(Mesh([[0, 1], [2, 3]], ("dp", "tp")), [Replicate(), Shard(1)], [64, 32])
    assert len(plan_reshard([ReshardItem(src, mixed, torch.float32)], bucket_bytes=64).relay) == 0
    classes = replica_classes(its, 10).tolist()
    assert classes[:2] == [-1, -1] and classes[2] != classes[3] >= 0
    assert classes[2:] == classes[2:4] * 4


@settings(max_examples=150, deadline=None)
@given(st.lists(items(WORLD), min_size=1, max_size=5))
def test_chunks_come_sorted_and_one_node_picks_as_no_nodes(its):
    # the pair order is a stable sort by (sender, receiver, item): chunks are made in region
    # order, which the full sort with regions confirms
    plan = plan_reshard(its, bucket_bytes=64, world_size=WORLD, relay=False)
    c = plan.chunks
    regions = [c.lo[:, d] for d in range(c.lo.shape[1] - 1, -1, -1)]
    assert (np.lexsort((*regions, c.item, c.receiver, c.sender)) == np.arange(len(c))).all()
    # the fast sender rotation (no nodes) picks what the node-aware one does on one node
    one = plan_reshard(its, bucket_bytes=64, world_size=WORLD, relay=False, node_of=[0] * WORLD)
    for a, b in ((c, one.chunks), (plan.local, one.local)):
        assert all((x == y).all() for x, y in zip(a._arrays(), b._arrays(), strict=True))


def test_relay_forwards_the_round_before_from_receive_staging():
    # two tensors, row-sharded over two trainer ranks, replicated on two engine ranks: the
    # head gets each tensor's halves from two senders in round 0 and, in round 1, sends that
    # receive staging on to the follower as it lies: one message, nothing packed; the head
    # receives the forwarded round wholly staged (it cannot go straight into storage), and
    # the follower unpacks it as one run per box in one multi-tensor copy
    from xfer.execute import round_directs, staging_need
    from xfer.staging import Locals

    src = Layout(Mesh([0, 1], ("tp",)), [Shard(0)], [16, 8])
    dst = Layout(Mesh([2, 3], ("dp",)), [Replicate()], [16, 8])
    its = [ReshardItem(src, dst, torch.float32, name) for name in ("a", "b")]
    plan = plan_reshard(its, bucket_bytes=1 << 20, relay=1)
    assert plan.relay.follower.tolist() == [3] and plan.rounds == 2
    fulls = [full_tensor(it.src.shape, it.dtype, seed=i) for i, it in enumerate(its)]
    dsts, progs = apply_plan(plan, fulls)
    assert all(same_bits(dsts[3][i], fulls[i]) for i in range(2))
    head, follower = progs[2], progs[3]
    assert [r.index for r in head.rounds] == [0, 1] and [r.index for r in follower.rounds] == [1]
    (hop,) = head.rounds[1].sends
    assert hop.forward and hop.peer == 3 and hop.nbytes == head.rounds[0].recv_bytes == 1024
    # the message is the head's staging: its copies are the head's receives, at their offsets
    got = [(c.item, c.index, m.offset + c.offset) for m in head.rounds[0].recvs for c in m.copies]
    assert [(c.item, c.index, c.offset) for c in hop.copies] == got
    assert follower.rounds[0].recvs[0].copies == hop.copies
    for prog in (head, follower):
        loc = Locals([None, None], [torch.zeros(16, 8) for _ in its])
        sends, recvs = round_directs(prog, loc.src_bytes, loc.dst_bytes)
        assert all(d.staged == 0 and d.copies == 0 for d in sends)  # nothing packed
        # the forwarded round is staged whole, as 4 runs (a box of a tensor per message)
        assert [(d.staged, d.copies) for d in recvs][:1] == [(1024, 4)]
        # two receive buffers, no send staging
        assert staging_need(prog, loc.src_bytes, loc.dst_bytes) == 2 * 1024


def test_a_forwarding_round_must_follow_the_round_it_forwards():
    from xfer.execute import round_directs
    from xfer.program import Message, RankProgram, Round

    bad = RankProgram(2, (Round(0, (), ()), Round(2, (Message(3, 0, 64, (), True),), ())), ())
    with pytest.raises(XferError, match="round 2 forwards 64 B to rank 3, but the round before"):
        round_directs(bad, [], [])


def test_a_rounds_contiguous_runs_go_in_one_multi_tensor_copy(monkeypatch):
    # the plan above: each rank's staged pack or unpack of a round is one multi-tensor copy
    # of its runs, whatever the number of boxes: the trainer ranks pack a run per tensor, the
    # head unpacks their two messages (4 runs), forwards them without a copy, and the
    # follower unpacks the same 4 runs
    calls = []
    real = torch._foreach_copy_

    def counting(dsts, srcs):
        calls.append(len(dsts))
        return real(dsts, srcs)

    monkeypatch.setattr(torch, "_foreach_copy_", counting)
    src = Layout(Mesh([0, 1], ("tp",)), [Shard(0)], [16, 8])
    dst = Layout(Mesh([2, 3], ("dp",)), [Replicate()], [16, 8])
    its = [ReshardItem(src, dst, torch.float32, name) for name in ("a", "b")]
    plan = plan_reshard(its, bucket_bytes=1 << 20, relay=1)
    fulls = [full_tensor(it.src.shape, it.dtype, seed=i) for i, it in enumerate(its)]
    dsts, _ = apply_plan(plan, fulls)
    assert all(same_bits(dsts[r][i], fulls[i]) for r in (2, 3) for i in range(2))
    assert calls == [2, 2, 4, 4]
