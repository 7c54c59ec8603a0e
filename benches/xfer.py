"""Micro-benchmark of the reshard kernel on local gloo ranks: p2p vs golden vs the baseline.

    python -m benches.xfer [--ranks 8] [--tensors 24] [--rows 1024] [--cols 1024] [--reps 3]

A batch of float32 tensors held by a trainer-like mesh (dp2 x tp2 on ranks 0-3, sharded on
dim 0) is resharded into an engine-like mesh (tp on the other ranks, sharded on dim 1).
Three ways, measured in one run on the same inputs:

* ``p2p``: `Resharder.run(path="p2p")`, the plan as grouped point-to-point messages;
* ``golden``: `Resharder.run(path="golden")`, every source cell broadcast to every rank;
* ``gather+bcast``: the common baseline: each full tensor is gathered on the trainer's first
  rank, broadcast to it and every engine rank, and each engine rank slices its shard.

Seconds are the median over `--reps` runs of the slowest rank's time between two barriers.
All three must produce the same bits as slicing the full tensor, or the benchmark fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np
import torch

from benches.baseline import gather
from harness.local import RankPool
from xfer import (
    DEFAULT_BUCKET_BYTES,
    Layout,
    Mesh,
    Replicate,
    Resharder,
    ReshardItem,
    Shard,
    TorchComm,
)
from xfer.comm import Comm

PATHS = ("p2p", "golden", "gather+bcast")


def build_items(world: int, tensors: int, rows: int, cols: int) -> list[ReshardItem]:
    train = Mesh([[0, 1], [2, 3]], ("dp", "tp"))
    engine = Mesh(list(range(4, world)), ("tp",))
    return [
        ReshardItem(
            Layout(train, [Replicate(), Shard(0)], (rows, cols)),
            Layout(engine, [Shard(1)], (rows, cols)),
            torch.float32,
            f"layers.{i}.weight",
        )
        for i in range(tensors)
    ]


def _full(i: int, rows: int, cols: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(rows, cols, generator=g)


def gather_broadcast(
    items: list[ReshardItem],
    srcs: list[torch.Tensor | None],
    dsts: list[torch.Tensor | None],
    comm: Comm,
    bcast: TorchComm | None,
    bcast_ranks: list[int],
) -> None:
    """The baseline: gather each full tensor on the trainer's first rank, broadcast it to
    that rank and every engine rank, slice."""
    rank = comm.rank
    for it, src, dst in zip(items, srcs, dsts, strict=True):
        root = it.src.mesh.flat[0]
        full = torch.empty(it.src.shape, dtype=it.dtype) if rank in bcast_ranks else None
        gather(it, root, rank, comm, full, src, lambda n: torch.empty(n, dtype=torch.uint8))
        if bcast is not None and full is not None:
            bcast.broadcast(full, bcast_ranks.index(root)).wait()
            if dst is not None:
                dst.copy_(full[it.dst.box(rank)])


def bench_rank(
    comm: Comm, port: int, world: int, tensors: int, rows: int, cols: int, reps: int, bucket: int
) -> dict:
    """One rank's side of the benchmark; returns its timings and whether results matched.
    The baseline's broadcast group joins through the store at `port` on 127.0.0.1."""
    from xfer.comm import tcp_store

    rank = comm.rank
    items = build_items(world, tensors, rows, cols)
    fulls = [_full(i, rows, cols) for i in range(tensors)]
    srcs = [
        f[it.src.box(rank)].clone() if it.src.holds(rank) else None
        for it, f in zip(items, fulls, strict=True)
    ]
    bcast_ranks = [0, *range(4, world)]
    store = tcp_store("127.0.0.1", port, is_master=False)
    bcast = (
        TorchComm.create(store, bcast_ranks.index(rank), len(bcast_ranks), prefix="bcast")
        if rank in bcast_ranks
        else None
    )
    resharder = Resharder(items, comm, bucket_bytes=bucket)
    _ = resharder.program  # build this rank's program outside the timed region
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    ok: dict[str, bool] = {}
    received: dict[str, int] = {}
    for rep in range(reps + 1):  # the first run of each path warms up
        for path in PATHS:
            dsts = [
                torch.zeros(it.dst.local_shape(rank)) if it.dst.holds(rank) else None
                for it in items
            ]
            comm.barrier()
            t0 = time.perf_counter()
            if path == "gather+bcast":
                gather_broadcast(items, srcs, dsts, comm, bcast, bcast_ranks)
                got = sum(
                    (f.numel() * 4 if rank in bcast_ranks and rank != 0 else 0) for f in fulls
                )
            else:
                stats = resharder.run(srcs, dsts, path=path)  # type: ignore[arg-type]
                got = stats.bytes_received
            comm.barrier()
            dt = time.perf_counter() - t0
            if rep:
                times[path].append(dt)
            received[path] = got
            ok[path] = all(
                d is None or torch.equal(d, f[it.dst.box(rank)])
                for it, d, f in zip(items, dsts, fulls, strict=True)
            )
    if bcast is not None:
        bcast.close()
    return {"times": times, "ok": ok, "received": received}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benches.xfer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--ranks", type=int, default=8, help="local gloo ranks (>= 6)")
    ap.add_argument("--tensors", type=int, default=24, help="tensors resharded per run")
    ap.add_argument("--rows", type=int, default=1024, help="rows of each tensor")
    ap.add_argument("--cols", type=int, default=1024, help="columns of each tensor")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions after a warm-up")
    ap.add_argument(
        "--bucket-mib", type=float, default=DEFAULT_BUCKET_BYTES / 2**20, help="p2p bucket size"
    )
    ap.add_argument("--json", help="write all figures to this file (default: none)")
    args = ap.parse_args(argv)
    if args.ranks < 6:
        ap.error("--ranks must be at least 6 (4 trainer ranks + 2 engine ranks)")
    from tqdm import tqdm

    from xfer.comm import tcp_store

    store = tcp_store("127.0.0.1", 0, is_master=True)
    pool = RankPool(args.ranks)
    mb = args.tensors * args.rows * args.cols * 4 / 2**20
    print(
        f"xfer micro-benchmark: {args.tensors} x [{args.rows}, {args.cols}] float32 ({mb:.0f} MiB), "
        f"(dp2, tp2) on ranks 0-3 -> (tp{args.ranks - 4}) on ranks 4-{args.ranks - 1}, gloo on "
        f"127.0.0.1, p2p bucket {args.bucket_mib:g} MiB, {platform.node()}"
    )
    try:
        with tqdm(total=1, desc="running", unit="batch", leave=False) as bar:
            results = pool.run(
                bench_rank,
                args.ranks,
                store.port,
                args.ranks,
                args.tensors,
                args.rows,
                args.cols,
                args.reps,
                int(args.bucket_mib * 2**20),
                timeout=1800,
            )
            bar.update(1)
    finally:
        pool.close()
    table = {}
    for path in PATHS:
        per_rep = [max(r["times"][path][k] for r in results) for k in range(args.reps)]
        table[path] = {
            "seconds": statistics.median(per_rep),
            "all_seconds": per_rep,
            "received_bytes": sum(r["received"][path] for r in results),
            "correct": all(r["ok"][path] for r in results),
        }
    base = table["p2p"]["seconds"]
    print(f"\n{'path':<14}{'seconds':>10}{'MiB received':>15}{'x p2p time':>12}  correct")
    for path, row in table.items():
        print(
            f"{path:<14}{row['seconds']:>10.3f}{row['received_bytes'] / 2**20:>15.1f}"
            f"{row['seconds'] / base:>12.2f}  {row['correct']}"
        )
    ratios = {
        "golden_over_p2p": table["golden"]["seconds"] / base,
        "gather_bcast_over_p2p": table["gather+bcast"]["seconds"] / base,
    }
    print(
        f"\np2p is {ratios['golden_over_p2p']:.1f}x faster than golden and "
        f"{ratios['gather_bcast_over_p2p']:.1f}x faster than gather+broadcast "
        f"(targets: 5x and 2x)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "paths": table, "ratios": ratios}, f, indent=2)
    if not all(row["correct"] for row in table.values()):
        print("ERROR: a path produced different bits", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    np.set_printoptions(linewidth=120)
    sys.exit(main())
