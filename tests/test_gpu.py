"""GPU checks (skipped without CUDA): CUDA pack/unpack, NCCL p2p == golden, nccl4py, m2n.

Multi-rank NCCL needs one GPU per rank; those tests also skip with fewer than two GPUs.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.strategies import full_tensor, same_bits
from tests.test_plan import apply_plan
from xfer import Layout, Mesh, Replicate, Resharder, ReshardItem, Shard, TorchComm, plan_reshard

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


def test_pack_unpack_on_cuda():
    its = _items(4)
    plan = plan_reshard(its, bucket_bytes=512)
    fulls = [full_tensor(it.src.shape, it.dtype, i) for i, it in enumerate(its)]
    dsts, _ = apply_plan(plan, fulls, device="cuda")
    for r in range(4):
        for i, it in enumerate(its):
            if it.dst.holds(r):
                assert same_bits(dsts[r][i].cpu(), fulls[i][it.dst.box(r)])


def _nccl_rank(rank: int, world: int, port: int, use_nccl4py: bool, out: dict) -> None:
    torch.cuda.set_device(rank)
    from xfer.comm import tcp_store

    store = tcp_store("127.0.0.1", port, is_master=rank == 0, world_size=world)
    if use_nccl4py:
        from xfer.nccl_comm import NcclComm

        comm = NcclComm.create(store, rank, world)
    else:
        comm = TorchComm.create(
            store, rank, world, backend="nccl", device=torch.device("cuda", rank)
        )
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
        stats = Resharder(its, comm, bucket_bytes=4096).run(srcs, dsts, path=path)
        torch.cuda.synchronize()
        got[path] = (
            stats.path,
            all(
                d is None or same_bits(d.cpu(), f[it.dst.box(rank)])
                for it, d, f in zip(its, dsts, fulls, strict=True)
            ),
        )
    out[rank] = got


def _spawn(world: int, use_nccl4py: bool) -> dict:
    import socket

    import torch.multiprocessing as tmp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = tmp.Manager()
    out = manager.dict()
    tmp.spawn(_nccl_rank, args=(world, port, use_nccl4py, out), nprocs=world, join=True)
    return dict(out)


@two_gpus
def test_nccl_p2p_equals_golden():
    world = 2 * (torch.cuda.device_count() // 2)
    out = _spawn(world, use_nccl4py=False)
    assert all(ok for got in out.values() for _, ok in got.values()), out


@two_gpus
def test_nccl4py_comm_and_m2n():
    pytest.importorskip("nccl.core")
    os.environ.setdefault("NCCL_DEBUG", "WARN")
    world = 2 * (torch.cuda.device_count() // 2)
    out = _spawn(world, use_nccl4py=True)
    assert all(ok for got in out.values() for _, ok in got.values()), out
    try:
        import nccl.m2n  # noqa: F401
    except Exception:
        return
    # with nccl-extensions installed, "auto" takes m2n for the evenly sharded items
    assert any("m2n" in got["auto"][0] for got in out.values()), out
