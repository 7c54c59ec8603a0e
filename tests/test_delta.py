"""Sparse-delta p2p (`xfer.delta`): every encoding round-trips exactly; on random layouts a
sequence of delta runs leaves the destinations bit-identical to a dense run and to slicing
the full tensors; unchanged messages put nothing on the wire; a rank whose baselines hold
another version makes every rank refuse before any data moves."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.local import RankError
from tests.strategies import full_tensor, items, same_bits
from tests.support import WORLD, fresh_dsts, local_view
from xfer import Baselines, Delta, RecordingComm, Resharder, XferError
from xfer.delta import BITMAP, DENSE, POSITIONS, SAME, decode, encode

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def changed(full: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """`full` with about `fraction` of its elements given other bits (deterministic)."""
    if full.numel() == 0 or fraction == 0:
        return full.clone()
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(full.shape, generator=g) < fraction
    bits = full.view(_INT[full.element_size()])
    other = torch.randint(1, 100, full.shape, generator=g).to(bits.dtype)
    return torch.where(mask, bits ^ other, bits).view(full.dtype)


@pytest.mark.parametrize("w", [1, 2, 4, 8])
@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.03, 0.3, 1.0])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_encodings_round_trip_exactly(w, fraction, offset):
    n = 4096 // w * w
    base = torch.randint(0, 256, (n,), dtype=torch.uint8)
    new = changed(base.view(_INT[w]), fraction, seed=w).view(torch.uint8)
    # the current bytes at an odd place of a staging buffer (words viewed through a copy)
    cur = torch.empty(n + offset, dtype=torch.uint8)[offset:]
    cur.copy_(new)
    # and the baseline at an odd place of the source baselines (a span of a shard)
    odd = torch.empty(n + offset, dtype=torch.uint8)[offset:]
    odd.copy_(base)
    kind, payload = encode(cur, odd, w)
    got = base.clone()
    if kind in (POSITIONS, BITMAP):
        assert payload is not None and payload.numel() < n
        padded = torch.empty(payload.numel() + 5, dtype=torch.uint8)[5:]  # misaligned too
        padded.copy_(payload)
        decode(kind, padded, got, w)
    elif kind == DENSE:
        assert payload is None
        got.copy_(cur)
    assert same_bits(got, new)
    # the cheapest exact form is chosen (dense on a tie)
    k = int((new.view(_INT[w]) != base.view(_INT[w])).sum())
    words = n // w
    sizes = {SAME: 0} if k == 0 else {POSITIONS: k * (4 + w), BITMAP: -(-words // 8) + k * w}
    size = {POSITIONS: 0, BITMAP: 0, DENSE: n, SAME: 0}[kind] if payload is None else len(payload)
    assert size == min([*sizes.values(), n])
    if fraction == 1.0:
        assert kind == DENSE  # nearly every word changed: dense is cheapest


def delta_steps(comm, its, bucket, mode, fractions, persist=False):
    """Run dense, then a delta per entry of `fractions` (the fraction of elements changed
    since the previous step), each into fresh destinations; compare with slicing and with a
    dense run of the same step; report what went over the wire."""
    rank = comm.rank
    fulls = [full_tensor(it.src.shape, it.dtype, i) for i, it in enumerate(its)]
    rec = RecordingComm(comm)
    resharder = Resharder(its, rec, bucket_bytes=bucket)
    dense = Resharder(its, comm, bucket_bytes=bucket)
    baselines = Baselines()
    out = []
    kept = fresh_dsts(its, rank, mode)  # with `persist`: the destinations every step
    in_place = frozenset(range(len(its))) if persist else frozenset()
    for step, fraction in enumerate([None, *fractions]):
        if fraction is not None:
            fulls = [changed(f, fraction, 1000 * step + i) for i, f in enumerate(fulls)]
        srcs = [
            local_view(it.src.local_shape(rank), it.dtype, mode, f[it.src.box(rank)])
            if it.src.holds(rank)
            else None
            for it, f in zip(its, fulls, strict=True)
        ]
        dsts = kept if persist else fresh_dsts(its, rank, mode)
        groups = len(rec.record.groups)
        against = None if step == 0 else step - 1
        delta = Delta(baselines, step, against, in_place=in_place)
        stats = resharder.run(srcs, dsts, delta=delta)
        ref = fresh_dsts(its, rank, mode)
        dense.run(srcs, ref, path="p2p")
        ok = [
            d is None or (same_bits(d.contiguous(), f[it.dst.box(rank)]) and same_bits(d, r))
            for it, d, r, f in zip(its, dsts, ref, fulls, strict=True)
        ]
        wire = [b for sends, _ in rec.record.groups[groups:] for _, b in sends]
        out.append(
            {
                "ok": ok,
                "stats": stats,
                "wire": sum(wire),
                "version": baselines.version,
                "baselines": baselines.nbytes,
            }
        )
    return out


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    its=st.lists(items(WORLD), min_size=1, max_size=3),
    bucket=st.sampled_from([48, 256, 1 << 20]),
    mode=st.sampled_from(["contiguous", "padded", "transposed", "segments"]),
)
def test_random_layouts_delta_equals_dense_equals_slicing(ranks, its, bucket, mode):
    results = ranks.run(delta_steps, WORLD, its, bucket, mode, [0.05, 0.0, 1.0, 0.3])
    for rank, steps in enumerate(results):
        for i, s in enumerate(steps):
            assert all(s["ok"]), (rank, i, s["ok"])
            assert s["version"] == i
        unchanged = steps[2]["stats"]
        assert unchanged.wire_bytes_sent == 0  # nothing changed: no payload at all
        assert unchanged.kinds_sent[0] == unchanged.messages_sent
        assert steps[0]["stats"].wire_bytes_sent == steps[0]["stats"].bytes_sent  # dense
        for s in steps:
            st_ = s["stats"]
            assert st_.wire_bytes_sent <= st_.bytes_sent
            assert sum(st_.kinds_sent) == st_.messages_sent


def _big_items():
    from xfer import Layout, Mesh, ReshardItem, Shard

    train = Mesh([[0, 1], [2, 3]], ("dp", "tp"))
    infer = Mesh([4, 5, 6, 7], ("tp",))
    return [
        ReshardItem(
            Layout(train, [Shard(0), Shard(1)], (256, 512)),
            Layout(infer, [Shard(0)], (256, 512)),
            torch.bfloat16,
            name=f"w{i}",
        )
        for i in range(4)
    ]


@pytest.mark.parametrize("mode", ["contiguous", "padded", "transposed", "segments"])
def test_destinations_that_persist_are_patched_in_place_without_baselines(ranks, mode):
    results = ranks.run(
        delta_steps, WORLD, _big_items(), 1 << 14, mode, [0.03, 0.0, 1.0, 0.2], True
    )
    for rank, steps in enumerate(results):
        for i, s in enumerate(steps):
            assert all(s["ok"]), (rank, i)
        # senders keep their shards; receivers patch their destinations and keep nothing
        last = steps[-1]["stats"]
        assert steps[-1]["baselines"] == last.bytes_sent
    sent = [sum(steps[i]["stats"].wire_bytes_sent for steps in results) for i in range(5)]
    assert sent[2] == 0 and sent[3] == sent[0] and 0 < sent[1] < 0.12 * sent[0]


def test_sparse_changes_put_a_fraction_of_the_bytes_on_the_wire(ranks):
    its = _big_items()
    results = ranks.run(delta_steps, WORLD, its, 1 << 16, "contiguous", [0.01, 0.03])
    sent = [[s["stats"].wire_bytes_sent for s in steps] for steps in results]
    dense = [[s["stats"].bytes_sent for s in steps] for steps in results]
    assert all(all(s["ok"]) for steps in results for s in steps)
    total = [sum(r[i] for r in sent) for i in range(3)]
    full = sum(r[0] for r in dense)
    assert total[0] == full > 0
    # 1% of bf16 words changed: int32 offset + value, 6 B per 2 B word changed -> ~3%
    assert 0.02 * full < total[1] < 0.045 * full
    assert 0.07 * full < total[2] < 0.11 * full  # 3% -> ~9%
    # baselines: one copy of what each rank sends (trainer ranks) or receives (engine ranks)
    for steps in results:
        last = steps[-1]["stats"]
        assert steps[-1]["baselines"] == last.bytes_sent + last.bytes_received > 0


def _shards(its, rank):
    """This rank's source shards of seed-0 full tensors."""
    return [
        full_tensor(it.src.shape, it.dtype, 0)[it.src.box(rank)].clone()
        if it.src.holds(rank)
        else None
        for it in its
    ]


def lost_baselines(comm, its):
    rank = comm.rank
    resharder = Resharder(its, comm)
    baselines = Baselines()
    srcs = _shards(its, rank)
    resharder.run(srcs, fresh_dsts(its, rank, "contiguous"), delta=Delta(baselines, 1))
    if rank == 5:
        baselines.reset()  # e.g. an engine rank whose weights were replaced behind its back
    dsts = fresh_dsts(its, rank, "contiguous")
    try:
        resharder.run(srcs, dsts, delta=Delta(baselines, 2, against=1))
    except XferError as e:
        untouched = all(d is None or not d.any() for d in dsts)
        return str(e), untouched, baselines.version
    return None, None, None


def test_a_rank_without_the_baselines_makes_every_rank_refuse_before_data_moves(ranks):
    results = ranks.run(lost_baselines, WORLD, _big_items())
    for message, untouched, version in results:
        assert message is not None
        assert (
            "rank 5: asked for a delta against version 1, but this rank's baselines hold none"
            in message
        )
        assert untouched  # nothing was written
        assert version in (1, None)


def fail_midway(comm, its):
    rank = comm.rank
    resharder = Resharder(its, comm, bucket_bytes=1 << 14)
    baselines = Baselines()
    srcs = _shards(its, rank)
    resharder.run(srcs, fresh_dsts(its, rank, "contiguous"), delta=Delta(baselines, 1))
    kept = baselines.nbytes
    bad = [None if d is None else d[..., :1] for d in fresh_dsts(its, rank, "contiguous")]
    with pytest.raises(XferError):
        resharder.run(srcs, bad, delta=Delta(baselines, 2, against=1))  # wrong shapes
    return kept, baselines.version


def test_bad_input_in_a_delta_run_is_refused_on_every_rank(ranks):
    results = ranks.run(fail_midway, WORLD, _big_items())
    assert all(kept > 0 and version == 1 for kept, version in results)


def test_delta_needs_p2p(ranks):
    with pytest.raises(RankError, match="a delta run takes path 'p2p'"):
        ranks.run(golden_delta, WORLD, _big_items())


def golden_delta(comm, its):
    rank = comm.rank
    srcs = _shards(its, rank)
    dsts = fresh_dsts(its, rank, "contiguous")
    Resharder(its, comm).run(srcs, dsts, path="golden", delta=Delta(Baselines(), 1))


def test_a_shard_sent_to_every_replica_keeps_one_baseline(ranks):
    from xfer import Layout, Mesh, Replicate, ReshardItem, Shard

    train = Mesh([[0, 1], [2, 3]], ("dp", "tp"))
    engines = Mesh([[4, 5], [6, 7]], ("replica", "tp"))  # two engine replicas of TP2
    its = [
        ReshardItem(
            Layout(train, [Shard(0), Shard(1)], (128, 256)),
            Layout(engines, [Replicate(), Shard(0)], (128, 256)),
            torch.bfloat16,
            name=f"w{i}",
        )
        for i in range(3)
    ]
    results = ranks.run(delta_steps, WORLD, its, 1 << 14, "contiguous", [0.03])
    for rank, steps in enumerate(results):
        assert all(all(s["ok"]) for s in steps)
        last = steps[-1]["stats"]
        if rank < 4:  # each shard goes to both replicas; its baseline is kept once
            assert last.bytes_sent == 2 * 3 * 64 * 128 * 2
            assert steps[-1]["baselines"] == last.bytes_sent // 2
        else:
            assert steps[-1]["baselines"] == last.bytes_received == 3 * 64 * 256 * 2


def receive_then_apply(comm, its, mode):
    """Receive-only runs (destinations untouched while the bytes arrive), then `apply`:
    the destinations equal slicing the full tensors, for a dense and a delta run."""
    rank = comm.rank
    resharder = Resharder(its, comm, bucket_bytes=1 << 14)
    baselines = Baselines()
    fulls = [full_tensor(it.src.shape, it.dtype, i) for i, it in enumerate(its)]
    out = []
    for version in (1, 2):
        if version == 2:
            fulls = [changed(f, 0.05, 7 + i) for i, f in enumerate(fulls)]
        srcs = [
            local_view(it.src.local_shape(rank), it.dtype, mode, f[it.src.box(rank)])
            if it.src.holds(rank)
            else None
            for it, f in zip(its, fulls, strict=True)
        ]
        against = None if version == 1 else 1
        delta = Delta(baselines, version, against, receive_only=True)
        stats = resharder.run(srcs, [None] * len(its), delta=delta)
        dsts = fresh_dsts(its, rank, mode)
        untouched = all(d is None or not d.contiguous().view(torch.uint8).any() for d in dsts)
        written = resharder.apply(dsts, baselines) if rank >= 4 else 0
        ok = [
            d is None or same_bits(d.contiguous(), f[it.dst.box(rank)])
            for it, d, f in zip(its, dsts, fulls, strict=True)
        ]
        out.append((untouched, all(ok), written, stats.bytes_received, stats.wire_bytes_sent))
    return out


@pytest.mark.parametrize("mode", ["contiguous", "padded", "segments"])
def test_receive_only_then_apply_equals_slicing(ranks, mode):
    results = ranks.run(receive_then_apply, WORLD, _big_items(), mode)
    for rank, steps in enumerate(results):
        for untouched, ok, written, received, _ in steps:
            assert untouched and ok, rank
            assert written == received  # every received byte written once, at apply
    # the second run was a delta: ~5% of bf16 words changed, 6 B each
    sent = sum(steps[1][4] for steps in results)
    dense = sum(steps[0][4] for steps in results)
    assert 0.10 * dense < sent < 0.20 * dense


def apply_bad_destination(comm, its):
    rank = comm.rank
    resharder = Resharder(its, comm)
    baselines = Baselines()
    srcs = _shards(its, rank)
    resharder.run(srcs, [None] * len(its), delta=Delta(baselines, 1, receive_only=True))
    if rank < 4:
        return None
    dsts = [None if d is None else d[..., :1] for d in fresh_dsts(its, rank, "contiguous")]
    with pytest.raises(XferError, match="local shape") as e:
        resharder.apply(dsts, baselines)
    return str(e.value)


def test_apply_refuses_bad_destinations_before_writing(ranks):
    results = ranks.run(apply_bad_destination, WORLD, _big_items())
    assert all(r is None for r in results[:4]) and all("local shape" in r for r in results[4:])
