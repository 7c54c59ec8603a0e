"""The private torch names xfer needs, in one place, checked against the torch version.

torch 2.13 has no public way to build a process group from a store without
``init_process_group`` (which a vLLM worker or a trainer has already called for its own,
unrelated default group), yet `xfer.TorchComm` needs a real `ProcessGroup` so that torch's
public point-to-point API works on it: ``dist.batch_isend_irecv`` with ``P2POp(group=...,
group_peer=...)`` is what fuses a round's sends and receives into one NCCL group on GPUs
(``_start_coalescing(device)`` / ``_end_coalescing(device)`` of a `ProcessGroup`), and issues
them one by one on gloo. The recipe, and its undo:

* build the backend (``ProcessGroupGloo`` / ``ProcessGroupNCCL``) on a `PrefixStore`, wrap it in
  ``dist.ProcessGroup(store, rank, size)`` with ``_set_default_backend`` and
  ``_register_backend(device, type, backend)``, and name it (``_set_group_name``);
* `P2POp` resolves ``group_peer`` through ``distributed_c10d._world.pg_group_ranks[group]``, so
  the group is entered there (identity map);
* `release` removes every entry again. A group left in those tables is never freed: each gloo
  group holds three threads and five sockets until the process ends.

Also ``torch._foreach_copy_``: the multi-tensor copy (one kernel launch for many contiguous
pairs on a GPU instead of one per pair) that packs and unpacks a round's contiguous runs;
`copy_many` falls back to a loop where it is missing.

`check()` raises a clear error when the installed torch lacks any of these names; the test
suite calls it, so a torch upgrade that changes them fails a test instead of a refit.
"""

from __future__ import annotations

import datetime
import socket
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["TESTED_TORCH", "bound_tcp_store", "check", "copy_many", "new_group", "release"]

TESTED_TORCH = ("2.13",)


def _c10d() -> Any:
    from torch.distributed import distributed_c10d

    return distributed_c10d


def check() -> None:
    """Raise `RuntimeError` naming every private torch name xfer needs that is missing."""
    c10d = _c10d()
    missing = [
        f"ProcessGroup.{n}"
        for n in ("_set_default_backend", "_register_backend", "_set_group_name")
        if not hasattr(dist.ProcessGroup, n)
    ]
    if not hasattr(dist.ProcessGroup, "BackendType"):
        missing.append("ProcessGroup.BackendType")
    world = getattr(c10d, "_world", None)
    if world is None or not hasattr(world, "pg_group_ranks"):
        missing.append("distributed_c10d._world.pg_group_ranks")
    if not hasattr(torch, "_foreach_copy_"):
        missing.append("torch._foreach_copy_")
    if missing:
        raise RuntimeError(
            f"torch {torch.__version__} lacks {missing}, which xfer.TorchComm needs to build "
            f"process groups from a store (tested with torch {', '.join(TESTED_TORCH)})"
        )


def copy_many(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """``dsts[i].copy_(srcs[i])`` for every i, in as few launches as torch allows."""
    if not dsts:
        return
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is None:
        for d, s in zip(dsts, srcs, strict=True):
            d.copy_(s)
        return
    foreach(dsts, srcs)


def new_group(
    store: dist.Store,
    rank: int,
    size: int,
    *,
    name: str,
    backend: str,
    timeout_s: float,
    device: torch.device | None = None,
    host: str | None = None,
) -> dist.ProcessGroup:
    """A `ProcessGroup` of `size` ranks over `store` (keys under `name`), separate from the
    default group. gloo listens on `host` when given; NCCL connects eagerly on `device`."""
    check()
    timeout = datetime.timedelta(seconds=timeout_s)
    prefix = dist.PrefixStore(f"{name}/", store)
    bt = dist.ProcessGroup.BackendType
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        opts._timeout = timeout
        opts._devices = [
            dist.ProcessGroupGloo.create_device(hostname=host)
            if host is not None
            else dist.ProcessGroupGloo.create_default_device()
        ]
        be: Any = dist.ProcessGroupGloo(dist.PrefixStore("cpu/", prefix), rank, size, opts)
        dev, kind = torch.device("cpu"), bt.GLOO
    elif backend == "nccl":
        nopts = dist.ProcessGroupNCCL.Options()
        nopts._timeout = timeout
        be = dist.ProcessGroupNCCL(dist.PrefixStore("cuda/", prefix), rank, size, nopts)
        dev, kind = device or torch.device("cuda", torch.cuda.current_device()), bt.NCCL
    else:
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    pg = dist.ProcessGroup(prefix, rank, size)
    pg._set_default_backend(kind)
    pg._register_backend(dev, kind, be)
    pg._set_group_name(name)  # type: ignore[arg-type]
    _c10d()._world.pg_group_ranks[pg] = {i: i for i in range(size)}
    if backend == "nccl":
        be.eager_connect_single_device(dev)
    return pg


def release(pg: dist.ProcessGroup) -> None:
    """Forget `pg` in torch's tables so that dropping the last reference frees it."""
    w = _c10d()._world
    for table in ("pg_group_ranks", "pg_map", "pg_names", "pg_backend_config", "pg_to_tag"):
        getattr(w, table, {}).pop(pg, None)
    coalesce = getattr(w, "pg_coalesce_state", None)
    if coalesce is not None:
        coalesce.pop(pg, None)


def bound_tcp_store(host: str, port: int, *, timeout_s: float) -> dist.TCPStore:
    """A TCPStore server that listens on `host` only (torch's own listens on every interface
    whatever host it is given): the socket is bound here and handed over by file descriptor
    (`master_listen_fd`, a public argument; the store takes ownership)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        bound = sock.getsockname()[1]
        fd = sock.detach()
    except BaseException:
        sock.close()
        raise
    return dist.TCPStore(
        host,
        bound,
        is_master=True,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=fd,
    )
