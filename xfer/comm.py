"""`Comm`: the small protocol the executors talk through, and its torch implementation.

A comm has a `rank` and a `size` and does four things: a grouped batch of point-to-point
sends and receives (`send_recv`), a `broadcast`, a `barrier`, and `abort`. Ranks are ranks of
the communicator. Asynchronous calls return a `Work`; ``wait()`` makes the result visible to
the caller (on CPU it blocks; on GPU the caller's stream waits).

Implementations:

* `TorchComm` wraps a torch `ProcessGroup` or backend: gloo on CPU, NCCL on GPU, the default
  group or one built from a store by `TorchComm.create` (which never touches the default
  group, so refit groups cannot disturb the trainer's or the engine's own).
* `NcclComm` (`xfer.nccl_comm`) wraps an nccl4py `Communicator`.
* `RecordingComm` wraps any comm and records every message, so tests (and users) can assert
  what went over the wire, not only the values that arrived.

Interrupting. A gloo wait cannot be cancelled (neither ``abort`` nor ``shutdown`` wakes a
pending receive, a timed wait closes the connection, and point-to-point works only complete
inside ``wait``), so a `TorchComm` given an ``interrupt`` callable waits in a helper thread
of its own and meanwhile calls ``interrupt()`` every few milliseconds; when that raises
(another rank failed, a deadline passed), the wait is abandoned and the exception propagates.
A communicator abandoned this way is broken: drop it (its connections close and the helper
thread ends) and build a new one.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

__all__ = [
    "Comm",
    "Done",
    "Recorded",
    "RecordingComm",
    "TorchComm",
    "Transfer",
    "Work",
    "tcp_store",
]


@dataclass(frozen=True)
class Transfer:
    """One point-to-point message: `buffer` goes to (or comes from) `peer`."""

    peer: int
    buffer: torch.Tensor


@runtime_checkable
class Work(Protocol):
    def wait(self) -> None: ...


@runtime_checkable
class Comm(Protocol):
    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    def send_recv(
        self, sends: Sequence[Transfer], recvs: Sequence[Transfer], *, stream: Any = None
    ) -> Work:
        """Post all sends and receives as one group; buffers must be contiguous."""
        ...

    def broadcast(self, tensor: torch.Tensor, root: int, *, stream: Any = None) -> Work:
        """In place: `tensor` on `root` is copied into `tensor` on every rank."""
        ...

    def barrier(self) -> None: ...

    def abort(self) -> None: ...


class Done:
    """A `Work` that has already completed."""

    def wait(self) -> None:
        return None


Interrupt = Callable[[], None]


class _Waiter:
    """One helper thread that runs a communicator's blocking waits."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def wait(self, works: list[Any], interrupt: Interrupt) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xfer-wait")
        done = self._pool.submit(lambda: [w.wait() for w in works])
        pause = 5e-5
        while True:
            try:
                done.result(timeout=pause)
                return
            except FutureTimeout:
                interrupt()  # raises to abandon the wait
                pause = min(pause * 2, 2e-3)


class _Works:
    def __init__(
        self, works: list[Any], interrupt: Interrupt | None = None, waiter: _Waiter | None = None
    ) -> None:
        self._works = works
        self._interrupt = interrupt
        self._waiter = waiter

    def wait(self) -> None:
        works, self._works = self._works, []
        if self._interrupt is None or self._waiter is None:
            for w in works:
                w.wait()
            return
        self._waiter.wait(works, self._interrupt)


def tcp_store(
    host: str, port: int, *, is_master: bool, world_size: int | None = None, timeout_s: float = 300
) -> dist.TCPStore:
    """A TCPStore client (or the server, on the master) for building refit groups."""
    return dist.TCPStore(
        host,
        port,
        world_size=world_size,
        is_master=is_master,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


class TorchComm:
    """A `Comm` over a torch process group (gloo on CPU, NCCL on GPU).

    Pass a `ProcessGroup` (``dist.group.WORLD`` or one from ``dist.new_group``) or a backend
    such as ``ProcessGroupGloo`` built directly from a store (see `create`).
    """

    def __init__(self, group: Any = None, *, interrupt: Interrupt | None = None) -> None:
        if group is None:
            if not dist.is_initialized():
                raise RuntimeError(
                    "TorchComm() needs a process group: initialize torch.distributed or pass one"
                )
            group = dist.distributed_c10d._get_default_group()
        self.group = group
        self._rank = int(group.rank())
        self._size = int(group.size())
        self._nccl = _backend_name(group) == "nccl"
        self.interrupt = interrupt
        self._waiter = _Waiter()

    @classmethod
    def create(
        cls,
        store: dist.Store,
        rank: int,
        size: int,
        *,
        prefix: str = "xfer",
        backend: str = "gloo",
        timeout_s: float = 300,
        device: torch.device | None = None,
        interrupt: Interrupt | None = None,
    ) -> TorchComm:
        """A new group of `size` ranks over `store` (keys under `prefix`), separate from the
        default group. `backend` is ``"gloo"`` or ``"nccl"``."""
        pstore = dist.PrefixStore(prefix, store)
        timeout = datetime.timedelta(seconds=timeout_s)
        if backend == "gloo":
            pg: Any = dist.ProcessGroupGloo(pstore, rank, size, timeout)
        elif backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            pg = dist.ProcessGroupNCCL(pstore, rank, size, opts)
            if device is not None:
                pg.eager_connect_single_device(device)
        else:
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        return cls(pg, interrupt=interrupt)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    def send_recv(
        self, sends: Sequence[Transfer], recvs: Sequence[Transfer], *, stream: Any = None
    ) -> Work:
        if not sends and not recvs:
            return Done()
        with _stream_ctx(stream):
            if self._nccl:
                device = (sends or recvs)[0].buffer.device
                self.group._start_coalescing(device)
                for s in sends:
                    self.group.send([s.buffer], s.peer, 0)
                for r in recvs:
                    self.group.recv([r.buffer], r.peer, 0)
                return _Works([self.group._end_coalescing(device)], self.interrupt, self._waiter)
            works = [self.group.send([s.buffer], s.peer, 0) for s in sends]
            works += [self.group.recv([r.buffer], r.peer, 0) for r in recvs]
            return _Works(works, self.interrupt, self._waiter)

    def broadcast(self, tensor: torch.Tensor, root: int, *, stream: Any = None) -> Work:
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        opts.rootTensor = 0
        with _stream_ctx(stream):
            return _Works([self.group.broadcast([tensor], opts)], self.interrupt, self._waiter)

    def barrier(self) -> None:
        _Works([self.group.barrier()], self.interrupt, self._waiter).wait()

    def abort(self) -> None:
        for name in ("abort", "shutdown", "_shutdown"):
            fn = getattr(self.group, name, None)
            if fn is not None:
                try:
                    fn()
                except RuntimeError:
                    continue
                return

    def __repr__(self) -> str:
        return f"TorchComm({_backend_name(self.group)}, rank {self._rank} of {self._size})"


def _backend_name(group: Any) -> str:
    for attr in ("name", "_get_backend_name"):
        fn = getattr(group, attr, None)
        if fn is not None:
            try:
                return str(fn()).lower()
            except (RuntimeError, TypeError):
                continue
    return "unknown"


class _stream_ctx:
    """``torch.cuda.stream(s)`` when a stream is given, otherwise nothing."""

    def __init__(self, stream: Any) -> None:
        self._ctx = torch.cuda.stream(stream) if stream is not None else None

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


@dataclass
class Recorded:
    """Everything a `RecordingComm` saw, in call order."""

    groups: list[tuple[list[tuple[int, int]], list[tuple[int, int]]]] = field(default_factory=list)
    broadcasts: list[tuple[int, int]] = field(default_factory=list)

    @property
    def sent(self) -> dict[int, int]:
        """Bytes sent to each peer (point-to-point only)."""
        out: dict[int, int] = {}
        for sends, _ in self.groups:
            for peer, n in sends:
                out[peer] = out.get(peer, 0) + n
        return out

    @property
    def received(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for _, recvs in self.groups:
            for peer, n in recvs:
                out[peer] = out.get(peer, 0) + n
        return out

    @property
    def messages_sent(self) -> int:
        return sum(len(s) for s, _ in self.groups)

    @property
    def messages_received(self) -> int:
        return sum(len(r) for _, r in self.groups)

    @property
    def broadcast_bytes(self) -> int:
        return sum(n for _, n in self.broadcasts)

    def clear(self) -> None:
        self.groups.clear()
        self.broadcasts.clear()


class RecordingComm:
    """Wraps a real `Comm` and records each message (peer, bytes) and each broadcast."""

    def __init__(self, inner: Comm) -> None:
        self.inner = inner
        self.record = Recorded()

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def size(self) -> int:
        return self.inner.size

    def send_recv(
        self, sends: Sequence[Transfer], recvs: Sequence[Transfer], *, stream: Any = None
    ) -> Work:
        self.record.groups.append(
            (
                [(s.peer, s.buffer.numel() * s.buffer.element_size()) for s in sends],
                [(r.peer, r.buffer.numel() * r.buffer.element_size()) for r in recvs],
            )
        )
        return self.inner.send_recv(sends, recvs, stream=stream)

    def broadcast(self, tensor: torch.Tensor, root: int, *, stream: Any = None) -> Work:
        self.record.broadcasts.append((root, tensor.numel() * tensor.element_size()))
        return self.inner.broadcast(tensor, root, stream=stream)

    def barrier(self) -> None:
        self.inner.barrier()

    def abort(self) -> None:
        self.inner.abort()
