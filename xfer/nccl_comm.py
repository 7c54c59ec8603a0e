"""`NcclComm`: the `Comm` protocol over an nccl4py `Communicator` (GPU only).

Streams. Operations are enqueued on `stream` (default: the caller's current stream). A given
stream first waits for the current stream, so a send reads its buffer only after the copies
that filled it, and a receive writes a reused buffer only after the copies that read it;
`Work.wait()` makes the *caller's* current stream wait for the operation (an event), so the
stream that consumes the data waits, not some other one. With an ``interrupt`` the host polls
the event (and calls ``interrupt()``) before that, so it never blocks on a kernel whose peer
died; `abort` then ends the kernel.

nccl4py reads tensors by pointer and does not check contiguity: `send_recv` and `broadcast`
refuse non-contiguous buffers and buffers on another device before anything is enqueued.

Rendezvous. Rank 0 makes the unique id and publishes it in the store under the
communicator's own key (``<key>/nccl-uid``): every communicator needs a fresh key, or a rank
could read an old id. `close` destroys the communicator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from xfer.comm import Transfer, Work, check_buffers

__all__ = ["NcclComm"]


def _nccl() -> Any:
    import nccl.core as nccl

    return nccl


class _EventWork:
    def __init__(self, stream: torch.cuda.Stream, interrupt: Callable[[], None] | None) -> None:
        self._event = torch.cuda.Event()
        self._event.record(stream)
        self._interrupt = interrupt

    def wait(self) -> None:
        if self._interrupt is not None:
            pause = 5e-5
            while not self._event.query():
                self._interrupt()
                time.sleep(pause)
                pause = min(pause * 2, 2e-3)
        torch.cuda.current_stream().wait_event(self._event)


class NcclComm:
    def __init__(self, communicator: Any, *, interrupt: Callable[[], None] | None = None) -> None:
        self.communicator = communicator
        self._rank = int(communicator.rank)
        self._size = int(communicator.nranks)
        self._device = torch.device("cuda", int(communicator.device.device_id))
        self.interrupt = interrupt

    @classmethod
    def create(
        cls,
        store: dist.Store,
        rank: int,
        size: int,
        *,
        key: str,
        interrupt: Callable[[], None] | None = None,
    ) -> NcclComm:
        """Rank 0 makes the unique id and publishes it in `store` under ``<key>/nccl-uid``;
        every rank joins. `key` must be new for every communicator. Call after
        ``torch.cuda.set_device``."""
        nccl = _nccl()
        uid_key = f"{key}/nccl-uid"
        if rank == 0:
            uid = nccl.get_unique_id()
            store.set(uid_key, bytes(uid).hex())
        else:
            uid = nccl.UniqueId.from_bytes(bytes.fromhex(store.get(uid_key).decode()))
        return cls(nccl.Communicator.init(size, rank, uid), interrupt=interrupt)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def device(self) -> torch.device:
        return self._device

    def _stream(self, stream: Any) -> torch.cuda.Stream:
        current = torch.cuda.current_stream(self._device)
        if stream is None or stream == current:
            return current
        stream.wait_stream(current)  # buffers were filled (or last read) on the current stream
        return stream

    def send_recv(
        self, sends: Sequence[Transfer], recvs: Sequence[Transfer], *, stream: Any = None
    ) -> Work:
        check_buffers(self, sends, recvs)
        nccl, s = _nccl(), self._stream(stream)
        with nccl.group():
            for t in sends:
                self.communicator.send(t.buffer, t.peer, stream=s.cuda_stream)
            for t in recvs:
                self.communicator.recv(t.buffer, t.peer, stream=s.cuda_stream)
        return _EventWork(s, self.interrupt)

    def broadcast(self, tensor: torch.Tensor, root: int, *, stream: Any = None) -> Work:
        check_buffers(self, [], [], [tensor])
        s = self._stream(stream)
        self.communicator.broadcast(tensor, tensor, root, stream=s.cuda_stream)
        return _EventWork(s, self.interrupt)

    def barrier(self) -> None:
        nccl = _nccl()
        t = torch.ones(1, device=self._device)
        s = torch.cuda.current_stream(self._device)
        self.communicator.allreduce(t, t, nccl.SUM, stream=s.cuda_stream)
        _EventWork(s, self.interrupt).wait()
        s.synchronize()

    def abort(self) -> None:
        self.communicator.abort()

    def close(self) -> None:
        destroy = getattr(self.communicator, "destroy", None)
        if destroy is not None:
            destroy()

    def __repr__(self) -> str:
        return f"NcclComm(rank {self._rank} of {self._size} on {self._device})"
