"""`NcclComm`: the `Comm` protocol over an nccl4py `Communicator` (GPU only).

Operations are enqueued on a CUDA stream (the given one, else the current one); `Work.wait()`
makes the caller's current stream wait for them, so nothing blocks the host. nccl4py reads
tensors by pointer and does not check contiguity; the executors only pass contiguous slices
of staging buffers. The unique id travels through a torch store as bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from xfer.comm import Transfer, Work

__all__ = ["NcclComm"]


def _nccl() -> Any:
    import nccl.core as nccl

    return nccl


class _EventWork:
    def __init__(self, stream: torch.cuda.Stream) -> None:
        self._event = torch.cuda.Event()
        self._event.record(stream)

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self._event)


class NcclComm:
    def __init__(self, communicator: Any) -> None:
        self.communicator = communicator
        self._rank = int(communicator.rank)
        self._size = int(communicator.nranks)
        self.device = torch.device("cuda", int(communicator.device.device_id))

    @classmethod
    def create(
        cls, store: dist.Store, rank: int, size: int, *, key: str = "xfer/nccl-uid"
    ) -> NcclComm:
        """Rank 0 makes the unique id and publishes it in `store`; every rank joins.
        Call after ``torch.cuda.set_device``."""
        nccl = _nccl()
        if rank == 0:
            uid = nccl.get_unique_id()
            store.set(key, bytes(uid).hex())
        else:
            uid = nccl.UniqueId.from_bytes(bytes.fromhex(store.get(key).decode()))
        return cls(nccl.Communicator.init(size, rank, uid))

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    def _stream(self, stream: Any) -> torch.cuda.Stream:
        return stream if stream is not None else torch.cuda.current_stream(self.device)

    def send_recv(
        self, sends: Sequence[Transfer], recvs: Sequence[Transfer], *, stream: Any = None
    ) -> Work:
        nccl, s = _nccl(), self._stream(stream)
        with nccl.group():
            for t in sends:
                self.communicator.send(t.buffer, t.peer, stream=s.cuda_stream)
            for t in recvs:
                self.communicator.recv(t.buffer, t.peer, stream=s.cuda_stream)
        return _EventWork(s)

    def broadcast(self, tensor: torch.Tensor, root: int, *, stream: Any = None) -> Work:
        s = self._stream(stream)
        self.communicator.broadcast(tensor, tensor, root, stream=s.cuda_stream)
        return _EventWork(s)

    def barrier(self) -> None:
        nccl = _nccl()
        t = torch.ones(1, device=self.device)
        s = torch.cuda.current_stream(self.device)
        self.communicator.allreduce(t, t, nccl.SUM, stream=s.cuda_stream)
        s.synchronize()

    def abort(self) -> None:
        self.communicator.abort()

    def __repr__(self) -> str:
        return f"NcclComm(rank {self._rank} of {self._size} on {self.device})"
