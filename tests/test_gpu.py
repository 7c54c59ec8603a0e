"""GPU checks (skipped without CUDA): the GPU path on real CUDA, NCCL, nccl4py and m2n.

One GPU: single-rank NCCL communicators (self send/recv, broadcast) through `TorchComm` and
`NcclComm`, a `Resharder` on one rank, pack/unpack on the device against the CPU bytes, the
m2n gate (NCCL version agreed, not assumed). Two or more GPUs (one per rank): NCCL p2p ==
golden == slicing for `TorchComm` and `NcclComm`, strict checking on, and `auto` taking m2n
where nccl-extensions and NCCL >= 2.30.5 allow it; a whole refit from torch trainer ranks
into a vLLM engine with CUDA graphs on, checked against HF transformers after every step
(`harness.scenario --device cuda`); sparse deltas: encodings on the device against pinned
host baselines, and delta and receive-only runs over NCCL equal to slicing. The README's GPU
check-list runs this file.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

from tests.strategies import full_tensor, same_bits
from tests.support import apply_plan
from xfer import (
    Layout,
    Mesh,
    Replicate,
    Resharder,
    ReshardItem,
    Shard,
    TorchComm,
    Transfer,
    plan_reshard,
    tcp_store,
)

pytestmark = pytest.mark.gpu

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


def _items(world: int) -> list[ReshardItem]:
    half = world // 2
    train = Mesh(list(range(half)), ("tp",))
    engine = Mesh(list(range(half, world)), ("tp",))
    return [
        ReshardItem(
            Layout(train, [Shard(0)], (64, 48)),
            Layout(engine, [Shard(1)], (64, 48)),
            dt,
            f"w{i}",
        )
        for i, dt in enumerate([torch.bfloat16, torch.float8_e4m3fn, torch.float32])
    ] + [
        ReshardItem(
            Layout(train, [Replicate()], (33,)), Layout(engine, [Shard(0)], (33,)), torch.int64
        )
    ]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("relay", [False, 1])
def test_pack_unpack_on_cuda(relay):
    # strided boxes, contiguous runs in one multi-tensor copy, and (relay) forwarding from
    # receive staging, all on the device
    its = _items(4)
    dst = Layout(Mesh([[2, 3], [4, 5], [6, 7]], ("dp", "tp")), [Replicate(), Shard(1)], [24, 40])
    src = Layout(Mesh([0, 1], ("tp",)), [Shard(0)], [24, 40])
    its += [ReshardItem(src, dst, dt) for dt in (torch.bfloat16, torch.float32)]
    plan = plan_reshard(its, bucket_bytes=512, relay=relay, world_size=8)
    assert len(plan.relay) == (2 if relay else 0)  # ranks 6, 7 (2, 3 hold the other items too)
    fulls = [full_tensor(it.src.shape, it.dtype, i) for i, it in enumerate(its)]
    dsts, _ = apply_plan(plan, fulls, device="cuda")
    for r in range(8):
        for i, it in enumerate(its):
            if it.dst.holds(r):
                assert same_bits(dsts[r][i].cpu(), fulls[i][it.dst.box(r)])


def test_single_rank_nccl_comm_sends_to_itself_and_broadcasts():
    store = tcp_store("127.0.0.1", 0, is_master=True)
    dev = torch.device("cuda", 0)
    comm = TorchComm.create(store, 0, 1, prefix="one", backend="nccl", device=dev)
    try:
        assert comm.device == dev
        src = torch.arange(1000, dtype=torch.float32, device=dev)
        dst = torch.zeros_like(src)
        comm.send_recv([Transfer(0, src)], [Transfer(0, dst)]).wait()
        comm.broadcast(dst, 0).wait()
        torch.cuda.synchronize()
        assert torch.equal(dst, src)
        # a CPU buffer is refused before anything is posted
        with pytest.raises(Exception, match="the communicator is on cuda"):
            comm.send_recv([Transfer(0, torch.zeros(4))], [])
    finally:
        comm.close()


def test_resharder_on_one_rank_golden_and_p2p():
    store = tcp_store("127.0.0.1", 0, is_master=True)
    dev = torch.device("cuda", 0)
    comm = TorchComm.create(store, 0, 1, prefix="one-rs", backend="nccl", device=dev)
    mesh = Mesh([0], ("x",))
    it = ReshardItem(
        Layout(mesh, [Shard(0)], (64, 32)), Layout(mesh, [Shard(1)], (64, 32)), torch.bfloat16
    )
    full = full_tensor((64, 32), torch.bfloat16, 3)
    try:
        for path in ("golden", "p2p", "auto"):
            dst = torch.zeros(64, 32, dtype=torch.bfloat16, device=dev)
            Resharder([it], comm).run([full.to(dev)], [dst], path=path)
            torch.cuda.synchronize()
            assert same_bits(dst.cpu(), full), path
    finally:
        comm.close()


def test_m2n_gate_names_why_it_is_off():
    from xfer import m2n

    why = m2n.rank_reason()
    v = m2n.nccl_version()
    if why is None:
        assert v is not None and v >= m2n.MIN_NCCL
    else:  # torch's own NCCL is older than nccl-extensions needs, or it is not installed
        assert "nccl" in why.lower() or "NCCL" in why


def _nccl_rank(rank: int, world: int, port: int, use_nccl4py: bool, out: dict) -> None:
    torch.cuda.set_device(rank)
    from xfer.strict import StrictComm

    store = tcp_store("127.0.0.1", port, is_master=rank == 0, world_size=world)
    if use_nccl4py:
        from xfer.nccl_comm import NcclComm

        comm = NcclComm.create(store, rank, world, key=f"test{port}")
    else:
        comm = TorchComm.create(
            store, rank, world, backend="nccl", device=torch.device("cuda", rank)
        )
    strict = StrictComm(comm, name="gpu")
    its = _items(world)
    fulls = [full_tensor(it.src.shape, it.dtype, i) for i, it in enumerate(its)]
    srcs = [
        f[it.src.box(rank)].cuda() if it.src.holds(rank) else None
        for it, f in zip(its, fulls, strict=True)
    ]
    got = {}
    for path in ("golden", "p2p", "auto"):
        dsts = [
            torch.zeros(it.dst.local_shape(rank), dtype=it.dtype, device="cuda")
            if it.dst.holds(rank)
            else None
            for it in its
        ]
        stats = Resharder(its, strict, bucket_bytes=4096).run(srcs, dsts, path=path)
        torch.cuda.synchronize()
        got[path] = (
            stats.path,
            all(
                d is None or same_bits(d.cpu(), f[it.dst.box(rank)])
                for it, d, f in zip(its, dsts, fulls, strict=True)
            ),
        )
    strict.check_order()
    comm.close()
    out[rank] = got


def _spawn(world: int, use_nccl4py: bool) -> dict:
    import torch.multiprocessing as tmp

    manager = tmp.Manager()
    out = manager.dict()
    tmp.spawn(_nccl_rank, args=(world, _port(), use_nccl4py, out), nprocs=world, join=True)
    return dict(out)


@two_gpus
def test_nccl_p2p_equals_golden():
    world = 2 * (torch.cuda.device_count() // 2)
    out = _spawn(world, use_nccl4py=False)
    assert all(ok for got in out.values() for _, ok in got.values()), out


def test_delta_encodings_on_cuda_against_pinned_host_baselines():
    from xfer.delta import BITMAP, DENSE, POSITIONS, SAME, Baselines, decode, encode

    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=g)
    host = Baselines("cpu")._copy(None, base.cuda())  # pinned: the transfer runs on a GPU
    assert host.is_pinned()
    for fraction in (0.0, 0.01, 0.3, 1.0):
        new = base.clone().view(torch.int16)
        mask = torch.rand(new.shape, generator=g) < fraction
        new[mask] ^= 5
        cur = new.view(torch.uint8).cuda()
        kind, payload = encode(cur, host, 2)
        got = host.clone()
        if kind in (POSITIONS, BITMAP):
            assert payload is not None and payload.is_cuda
            decode(kind, payload, got, 2)
        elif kind == DENSE:
            got.copy_(cur)
        else:
            assert kind == SAME and fraction == 0.0
        torch.cuda.synchronize()
        assert torch.equal(got, new.view(torch.uint8)), fraction


def _nccl_delta_rank(rank: int, world: int, port: int, out: dict) -> None:
    torch.cuda.set_device(rank)
    from xfer import Baselines, Delta
    from xfer.strict import StrictComm

    store = tcp_store("127.0.0.1", port, is_master=rank == 0, world_size=world)
    comm = TorchComm.create(store, rank, world, backend="nccl", device=torch.device("cuda", rank))
    strict = StrictComm(comm, name="gpu-delta")
    its = _items(world)
    resharder = Resharder(its, strict, bucket_bytes=4096)
    baselines = Baselines("cpu")
    fulls = [full_tensor(it.src.shape, it.dtype, i) for i, it in enumerate(its)]
    ok = []
    for version in (1, 2, 3):
        if version > 1:  # change about 3% of every tensor's bytes
            fulls = [f.clone() for f in fulls]
            for f in fulls:
                b = f.view(torch.uint8).view(-1)
                b[:: max(1, b.numel() // 30)] ^= 1
        srcs = [
            f[it.src.box(rank)].cuda() if it.src.holds(rank) else None
            for it, f in zip(its, fulls, strict=True)
        ]
        receive_only = version == 3  # the last one as an engine serving meanwhile would
        dsts = [
            torch.zeros(it.dst.local_shape(rank), dtype=it.dtype, device="cuda")
            if it.dst.holds(rank)
            else None
            for it in its
        ]
        delta = Delta(baselines, version, None if version == 1 else version - 1, receive_only)
        resharder.run(srcs, [None] * len(its) if receive_only else dsts, delta=delta)
        if receive_only and rank >= world // 2:
            resharder.apply(dsts, baselines)
        torch.cuda.synchronize()
        ok.append(
            all(
                d is None or same_bits(d.cpu(), f[it.dst.box(rank)])
                for it, d, f in zip(its, dsts, fulls, strict=True)
            )
        )
    strict.check_order()
    comm.close()
    out[rank] = ok


@two_gpus
def test_nccl_delta_and_receive_only_equal_slicing():
    import torch.multiprocessing as tmp

    world = 2 * (torch.cuda.device_count() // 2)
    out = tmp.Manager().dict()
    tmp.spawn(_nccl_delta_rank, args=(world, _port(), out), nprocs=world, join=True)
    assert all(all(v) for v in out.values()), dict(out)


@two_gpus
def test_nccl4py_comm_and_m2n():
    pytest.importorskip("nccl.core")
    os.environ.setdefault("NCCL_DEBUG", "WARN")
    world = 2 * (torch.cuda.device_count() // 2)
    out = _spawn(world, use_nccl4py=True)
    assert all(ok for got in out.values() for _, ok in got.values()), out
    from xfer import m2n

    if m2n.rank_reason() is None:  # nccl-extensions with a new enough NCCL: auto takes m2n
        assert any("m2n" in got["auto"][0] for got in out.values()), out


@two_gpus
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_refit_into_a_vllm_engine_with_cuda_graphs(tmp_path):
    from tests.support import assert_good, scenario

    r = scenario(
        tmp_path, "--model", "qwen3_moe", "--trainer-tp", "1", "--device", "cuda",
        "--steps", "3", "--verify", timeout=1100,
    )  # fmt: skip
    assert_good(r, 3)
    for s in r.steps:
        assert s.engine_extra_bytes > 0 and s.trainer_extra_bytes >= 0


@two_gpus
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_megatron_rank_into_a_vllm_engine_over_20_steps_verified(tmp_path):
    from tests.support import check_megatron as check
    from tests.support import scenario

    layout = "tp2" if torch.cuda.device_count() >= 3 else "tp1"  # one GPU left for the engine
    r = scenario(
        tmp_path, "--trainer", "megatron", "--model", "qwen3_moe", "--device", "cuda",
        "--layouts", layout, "--steps", "20", "--verify", timeout=1700,
    )  # fmt: skip
    assert len(r.layouts[0].steps) == 20
    check(r, [layout], steps=20)


@two_gpus
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_trainer_rank_killed_mid_refit_leaves_the_engine_alive_and_stale(tmp_path):
    import subprocess
    import sys

    if torch.cuda.device_count() < 3:
        pytest.skip("needs 3 GPUs: two trainer ranks and an engine")
    out = tmp_path / "faults.json"
    subprocess.run(
        [sys.executable, "-m", "harness.faults", "--device", "cuda", "--timeout", "20",
         "--only", "trainer rank process dies", "--json", str(out)],
        timeout=850, check=False,
    )  # fmt: skip
    from harness.fault_report import CampaignReport
    from harness.reports import read

    (rec,) = read(CampaignReport, out).cases
    assert rec.raised and set(rec.sides_raised) == {"trainer", "engine"}
    st = rec.status_after
    assert st is not None and st.alive and st.stale and st.generate_refused  # NCCL aborted
    assert rec.recovered
