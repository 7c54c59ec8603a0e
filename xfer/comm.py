"""`Comm`: the small protocol the executors talk through, and its torch implementation.

A comm has a `rank`, a `size` and a `device` (where the tensors it moves live), and does four
things: a grouped batch of point-to-point sends and receives (`send_recv`), a `broadcast`, a
`barrier`, and `abort`; `close` releases it. Ranks are ranks of the communicator.
Asynchronous calls return a `Work`.

The rules every comm and every caller follow are NCCL's, whatever the backend:

* a receive's bytes are in its buffer only once ``wait()`` has returned; until then the
  buffer must be neither read nor written;
* a send may read its buffer until ``wait()`` returns; until then it must not be written;
* ``wait()`` makes the result visible to the *calling thread* (on a GPU: to the caller's
  current CUDA stream), so the thread that consumes the data waits, on the stream it
  consumes it on;
* buffers are contiguous and on the comm's device; every rank issues operations on its
  communicators in the same order.

`xfer.testing.StrictComm` enforces these on CPU, so the CPU tests hold the GPU path to them.

Implementations:

* `TorchComm` wraps a torch `ProcessGroup`: gloo on CPU, NCCL on GPU. `TorchComm.create`
  builds one from a store without touching the default group (`xfer.torch_private`), so refit
  groups never disturb the trainer's or the engine's own. Point-to-point goes through torch's
  public ``dist.batch_isend_irecv`` on both backends (fused into one NCCL group on GPUs).
* `NcclComm` (`xfer.nccl_comm`) wraps an nccl4py `Communicator`.
* `RecordingComm` wraps any comm and records every message, so tests (and users) can assert
  what went over the wire, not only the values that arrived.

Interrupting. A comm given an ``interrupt`` callable calls it every few milliseconds while it
waits; when it raises (another rank failed, a deadline passed) the wait is abandoned and the
exception propagates. On NCCL the caller polls ``Work.is_completed()`` (the host never blocks
on a kernel that may never finish) and then waits on its own stream; a gloo point-to-point
work completes only inside ``wait()`` and cannot be cancelled, so gloo waits run in a helper
thread while the caller polls. An abandoned communicator is broken: `abort` it (NCCL kernels
waiting on a dead peer are killed) and `close` it; a new one must be built.
"""

from __future__ import annotations

import contextlib
import datetime
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from xfer import torch_private
from xfer.errors import XferError

__all__ = [
    "Comm",
    "Done",
    "Recorded",
    "RecordingComm",
    "TorchComm",
    "Transfer",
    "Work",
    "check_buffers",
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

    @property
    def device(self) -> torch.device: ...

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

    def close(self) -> None: ...


class Done:
    """A `Work` that has already completed."""

    def wait(self) -> None:
        return None


Interrupt = Callable[[], None]


def check_buffers(
    comm: Comm, sends: Sequence[Transfer], recvs: Sequence[Transfer], tensors: Sequence[Any] = ()
) -> None:
    """Refuse, before anything is posted, buffers NCCL would misread: not contiguous, on
    another device than the comm's, or peers outside the communicator."""
    problems = []
    for kind, ts in (("send", sends), ("receive", recvs)):
        for t in ts:
            if not 0 <= t.peer < comm.size:
                problems.append(f"{kind} peer {t.peer} of rank {comm.rank} (size {comm.size})")
    for t in [*(x.buffer for x in (*sends, *recvs)), *tensors]:
        if not t.is_contiguous():
            problems.append(f"buffer {list(t.shape)} with strides {t.stride()} is not contiguous")
        if t.device != comm.device:
            problems.append(f"buffer on {t.device}, the communicator is on {comm.device}")
    if problems:
        raise XferError([f"rank {comm.rank}: {p}" for p in problems])


class _Waiter:
    """One helper thread that runs a gloo communicator's blocking waits."""

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

    def close(self, finalize: Callable[[], None]) -> None:
        """Run `finalize` once no wait is pending (an abandoned gloo wait ends when its
        peers close their groups or the group times out), without blocking the caller."""
        pool, self._pool = self._pool, None
        if pool is None:
            finalize()
            return
        try:
            pool.submit(finalize)
        except RuntimeError:  # the interpreter is exiting: no new threads
            finalize()
        pool.shutdown(wait=False)


class _TorchWork:
    def __init__(self, works: list[Any], comm: TorchComm) -> None:
        self._works = works
        self._comm = comm

    def wait(self) -> None:
        works, self._works = self._works, []
        if works:
            self._comm._wait(works)


def tcp_store(
    host: str, port: int, *, is_master: bool, world_size: int | None = None, timeout_s: float = 300
) -> dist.TCPStore:
    """A TCPStore client, or on the master a server listening on `host` only."""
    if is_master:
        return torch_private.bound_tcp_store(host, port, timeout_s=timeout_s)
    return dist.TCPStore(
        host,
        port,
        world_size=world_size,
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


class TorchComm:
    """A `Comm` over a torch process group (gloo on CPU, NCCL on GPU).

    Pass a `ProcessGroup` (``dist.group.WORLD`` or one from ``dist.new_group``), or build one
    from a store with `create`.
    """

    def __init__(
        self,
        group: Any = None,
        *,
        interrupt: Interrupt | None = None,
        device: torch.device | None = None,
        owned: bool = False,
    ) -> None:
        if group is None:
            if not dist.is_initialized():
                raise RuntimeError(
                    "TorchComm() needs a process group: initialize torch.distributed or pass one"
                )
            group = dist.distributed_c10d._get_default_group()
        self.group: Any = group
        self._rank = int(group.rank())
        self._size = int(group.size())
        self.backend = _backend_name(group)
        self._nccl = self.backend == "nccl"
        if device is None:
            device = (
                torch.device("cuda", torch.cuda.current_device())
                if self._nccl
                else torch.device("cpu")
            )
        self._device = device
        self.interrupt = interrupt
        self._owned = owned  # built by `create`: `close` releases it
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
        host: str | None = None,
    ) -> TorchComm:
        """A new group of `size` ranks over `store` (keys under `prefix`), separate from the
        default group. `backend` is ``"gloo"`` (CPU tensors; listening on `host` when given)
        or ``"nccl"`` (CUDA tensors on `device`)."""
        if backend not in ("gloo", "nccl"):
            raise XferError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if backend == "nccl" and (device is None or device.type != "cuda"):
            raise XferError(f"backend 'nccl' needs a CUDA device, got {device}")
        pg = torch_private.new_group(
            store,
            rank,
            size,
            name=prefix,
            backend=backend,
            timeout_s=timeout_s,
            device=device,
            host=host,
        )
        return cls(pg, interrupt=interrupt, device=device, owned=True)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def device(self) -> torch.device:
        return self._device

    def send_recv(
        self, sends: Sequence[Transfer], recvs: Sequence[Transfer], *, stream: Any = None
    ) -> Work:
        if not sends and not recvs:
            return Done()
        check_buffers(self, sends, recvs)
        ops = [dist.P2POp(dist.isend, s.buffer, group=self.group, group_peer=s.peer) for s in sends]
        ops += [
            dist.P2POp(dist.irecv, r.buffer, group=self.group, group_peer=r.peer) for r in recvs
        ]
        with _stream_ctx(stream):
            works = dist.batch_isend_irecv(ops)
        return _TorchWork([w for w in works if w is not None], self)

    def broadcast(self, tensor: torch.Tensor, root: int, *, stream: Any = None) -> Work:
        check_buffers(self, [], [], [tensor])
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        opts.rootTensor = 0
        with _stream_ctx(stream):
            return _TorchWork([self.group.broadcast([tensor], opts)], self)

    def barrier(self) -> None:
        t = torch.zeros(1, dtype=torch.uint8, device=self._device)
        self.broadcast(t, 0).wait()
        if self._nccl:
            torch.cuda.current_stream(self._device).synchronize()

    def _wait(self, works: list[Any]) -> None:
        interrupt = self.interrupt
        if self._nccl:
            if interrupt is not None:  # the host never blocks on a kernel that may not end
                pause = 5e-5
                while not all(w.is_completed() for w in works):
                    interrupt()
                    time.sleep(pause)
                    pause = min(pause * 2, 2e-3)
            for w in works:
                w.wait()  # the calling thread's current stream waits for the NCCL stream
        elif interrupt is None:
            for w in works:
                w.wait()
        else:
            self._waiter.wait(works, interrupt)

    def abort(self) -> None:
        """Abort pending operations (NCCL kernels waiting on a dead peer end); the comm is
        unusable afterwards. gloo cannot abort a pending wait: its peers closing their
        groups ends it."""
        if self.group is None or not self._nccl:
            return
        with contextlib.suppress(RuntimeError):
            self.group.abort()

    def close(self) -> None:
        """Release the group: a group built by `create` is freed (its threads and sockets
        with it) as soon as no abandoned wait is pending on it. Never blocks: destroying a
        gloo group with pending work would wait for the group's timeout."""
        group, self.group = self.group, None
        owned, nccl = self._owned, self._nccl
        self.interrupt = None  # it usually refers to the owner: no cycle keeps this alive

        def release() -> None:
            if group is None or not owned:
                return
            if nccl:
                try:
                    group.shutdown()
                except RuntimeError:
                    group.abort()
            torch_private.release(group)

        self._waiter.close(release)

    def __repr__(self) -> str:
        return f"TorchComm({self.backend}, rank {self._rank} of {self._size} on {self._device})"


def _backend_name(group: Any) -> str:
    for attr in ("name", "_get_backend_name"):
        fn = getattr(group, attr, None)
        if fn is not None:
            try:
                name = str(fn()).lower()
            except (RuntimeError, TypeError):
                continue
            if name not in ("", "undefined"):
                return name
    try:
        return str(dist.get_backend(group)).lower()
    except (RuntimeError, ValueError):
        return "unknown"


class _stream_ctx:
    """Issue on `stream` when one is given (after it waits for the current stream, which
    filled the send buffers and last read the receive buffers); otherwise nothing."""

    def __init__(self, stream: Any) -> None:
        self._ctx = None
        if stream is not None:
            if stream != torch.cuda.current_stream(stream.device):
                stream.wait_stream(torch.cuda.current_stream(stream.device))
            self._ctx = torch.cuda.stream(stream)

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


@dataclass
class Recorded:
    """Everything a `RecordingComm` saw, in call order: per `send_recv`, the (peer, bytes) of
    its sends and its receives; per broadcast, (root, bytes)."""

    groups: list[tuple[list[tuple[int, int]], list[tuple[int, int]]]] = field(default_factory=list)
    broadcasts: list[tuple[int, int]] = field(default_factory=list)

    def clear(self) -> None:
        self.groups.clear()
        self.broadcasts.clear()


class RecordingComm:
    """Wraps a real `Comm` and records each message (peer, bytes) and each broadcast."""

    def __init__(self, inner: Comm) -> None:
        self.inner = inner
        self.record = Recorded()
        self._lock = threading.Lock()

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def send_recv(
        self, sends: Sequence[Transfer], recvs: Sequence[Transfer], *, stream: Any = None
    ) -> Work:
        with self._lock:
            self.record.groups.append(
                (
                    [(s.peer, s.buffer.numel() * s.buffer.element_size()) for s in sends],
                    [(r.peer, r.buffer.numel() * r.buffer.element_size()) for r in recvs],
                )
            )
        return self.inner.send_recv(sends, recvs, stream=stream)

    def broadcast(self, tensor: torch.Tensor, root: int, *, stream: Any = None) -> Work:
        with self._lock:
            self.record.broadcasts.append((root, tensor.numel() * tensor.element_size()))
        return self.inner.broadcast(tensor, root, stream=stream)

    def barrier(self) -> None:
        self.inner.barrier()

    def abort(self) -> None:
        self.inner.abort()

    def close(self) -> None:
        self.inner.close()
