"""`StrictComm`: a comm that holds its callers to NCCL's rules on any backend.

A test double and a debugging aid (``Refitter(strict=True)``): it wraps a real comm (gloo on
CPU) and makes every rule of `xfer.comm` observable, so CPU tests fail where a GPU would give
wrong data or hang:

* **receives land only when waited on**: the bytes arrive in a private buffer; the caller's
  buffer is filled with a poison pattern at once and gets the data only inside ``wait()``.
  Code that reads a receive buffer early reads poison; code that writes it before ``wait()``
  is reported (the poison must still be intact when the data lands);
* **send buffers are busy until waited on**: each send buffer's digest is taken when posted
  and checked in ``wait()``; a changed buffer is reported;
* **the consumer waits**: ``wait()`` must be called on the thread that posted the operation
  (NCCL makes the *calling* thread's stream wait: a wait on a helper thread leaves the
  consumer's stream unordered), and a work that is never waited never lands;
* **one order of communicators**: posts are logged per process (`OrderLog`, shared by the
  comms of one rank); `StrictComm.check_order` exchanges the logs of every rank and reports
  ranks that used their communicators in different orders, or posted different collectives
  on one communicator; a communicator used by two threads at once is reported at once;
* **one device, contiguous buffers** (`xfer.comm.check_buffers`).

Violations raise `XferError` naming the rule, the rank and the buffer. The checks copy and
hash every buffer: strict runs are slower and use twice the receive memory.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from xfer import wire
from xfer.comm import Comm, Transfer, Work, check_buffers
from xfer.errors import XferError

__all__ = ["OrderLog", "StrictComm", "order_problems"]

POISON = 0xA5


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)


def _digest(t: torch.Tensor) -> str:
    return hashlib.blake2b(_bytes(t).cpu().numpy().tobytes(), digest_size=16).hexdigest()


@dataclass
class OrderLog:
    """The posts of one rank's strict comms, in order: (communicator, kind, detail)."""

    entries: list[tuple[str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, comm: str, kind: str, detail: str) -> None:
        with self.lock:
            self.entries.append((comm, kind, detail))

    def take(self) -> list[tuple[str, str, str]]:
        with self.lock:
            out, self.entries = self.entries, []
        return out


def _runs(log: Sequence[Sequence[str]], comms: set[str]) -> list[str]:
    """The communicators of `comms` in `log`, one entry per run of consecutive posts."""
    seq = [e[0] for e in log if e[0] in comms]
    return [c for i, c in enumerate(seq) if i == 0 or seq[i - 1] != c]


def order_problems(logs: Sequence[Sequence[Sequence[str]]]) -> list[str]:
    """What NCCL would deadlock or mismatch on, from every rank's `OrderLog` entries: two
    ranks using their shared communicators in different orders, or posting different
    collectives on one communicator."""
    out = []
    for a in range(len(logs)):
        for b in range(a + 1, len(logs)):
            shared = {e[0] for e in logs[a]} & {e[0] for e in logs[b]}
            if len(shared) > 1 and _runs(logs[a], shared) != _runs(logs[b], shared):
                out.append(
                    f"ranks {a} and {b} use their communicators in different orders: "
                    f"{_runs(logs[a], shared)[:6]} vs {_runs(logs[b], shared)[:6]}"
                )
            for c in sorted(shared):
                ca = [tuple(e[1:]) for e in logs[a] if e[0] == c and e[1] == "broadcast"]
                cb = [tuple(e[1:]) for e in logs[b] if e[0] == c and e[1] == "broadcast"]
                if ca != cb:
                    out.append(
                        f"ranks {a} and {b} post different collectives on {c}: {ca[:4]} vs {cb[:4]}"
                    )
    return out


class _StrictWork:
    def __init__(
        self,
        comm: StrictComm,
        inner: Work,
        sends: list[tuple[torch.Tensor, str]],
        recvs: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        self._comm = comm
        self._inner: Work | None = inner
        self._sends = sends
        self._recvs = recvs
        self._thread = threading.get_ident()
        comm._pending += 1

    def wait(self) -> None:
        if self._inner is None:
            return
        rank = self._comm.rank
        if threading.get_ident() != self._thread:
            raise XferError(
                f"rank {rank}: wait() called on another thread than the one that posted the "
                "operation; NCCL makes the waiting thread's stream wait, not the consumer's"
            )
        inner, self._inner = self._inner, None
        self._comm._pending -= 1
        inner.wait()
        problems = []
        for buf, digest in self._sends:
            if _digest(buf) != digest:
                problems.append(
                    f"rank {rank}: a send buffer {list(buf.shape)} {buf.dtype} changed before "
                    "wait() returned (NCCL may still be reading it)"
                )
        for buf, landed in self._recvs:
            b = _bytes(buf)
            if b.numel() and not bool((b == POISON).all()):
                problems.append(
                    f"rank {rank}: a receive buffer {list(buf.shape)} {buf.dtype} was written "
                    "before wait() returned (NCCL writes it until then)"
                )
            buf.copy_(landed)
        if problems:
            raise XferError(problems)


class StrictComm:
    """Wraps `inner` and enforces NCCL's rules (see the module docstring)."""

    def __init__(self, inner: Comm, *, name: str = "comm", log: OrderLog | None = None) -> None:
        self.inner = inner
        self.name = name
        self.log = log if log is not None else OrderLog()
        self._pending = 0
        self._posting = threading.Lock()

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def pending(self) -> int:
        """Operations posted and not yet waited."""
        return self._pending

    def _enter(self) -> None:
        if not self._posting.acquire(blocking=False):
            raise XferError(
                f"rank {self.rank}: communicator {self.name} is posted to by two threads at "
                "once; NCCL requires one order of operations per communicator"
            )

    def send_recv(
        self, sends: Sequence[Transfer], recvs: Sequence[Transfer], *, stream: Any = None
    ) -> Work:
        check_buffers(self, sends, recvs)
        self._enter()
        try:
            peers = f"send {sorted(s.peer for s in sends)} recv {sorted(r.peer for r in recvs)}"
            self.log.add(self.name, "send_recv", peers)
            landing = [torch.empty_like(r.buffer) for r in recvs]
            inner = self.inner.send_recv(
                list(sends),
                [Transfer(r.peer, t) for r, t in zip(recvs, landing, strict=True)],
                stream=stream,
            )
            for r in recvs:
                _bytes(r.buffer).fill_(POISON)
            return _StrictWork(
                self,
                inner,
                [(s.buffer, _digest(s.buffer)) for s in sends],
                [(r.buffer, t) for r, t in zip(recvs, landing, strict=True)],
            )
        finally:
            self._posting.release()

    def broadcast(self, tensor: torch.Tensor, root: int, *, stream: Any = None) -> Work:
        check_buffers(self, [], [], [tensor])
        self._enter()
        try:
            nbytes = tensor.numel() * tensor.element_size()
            self.log.add(self.name, "broadcast", f"root {root} {nbytes} B")
            if self.rank == root:
                inner = self.inner.broadcast(tensor, root, stream=stream)
                return _StrictWork(self, inner, [(tensor, _digest(tensor))], [])
            landing = torch.empty_like(tensor)
            inner = self.inner.broadcast(landing, root, stream=stream)
            _bytes(tensor).fill_(POISON)
            return _StrictWork(self, inner, [], [(tensor, landing)])
        finally:
            self._posting.release()

    def barrier(self) -> None:
        self.log.add(self.name, "broadcast", "barrier")
        self.inner.barrier()

    def abort(self) -> None:
        self.inner.abort()

    def close(self) -> None:
        self.inner.close()

    def check_order(self) -> None:
        """Exchange every rank's `OrderLog` over this comm and raise `XferError` where two
        ranks posted in orders NCCL would deadlock or mismatch on; clears the log. Also
        raises if this rank left operations posted and never waited."""
        from xfer.validate import exchange

        mine = self.log.take()
        if self._pending:  # their messages would be matched by the exchange below
            raise XferError(f"rank {self.rank}: {self._pending} operations were never waited")
        logs = [wire.loads(p) for p in exchange(self.inner, wire.dumps(mine))]
        problems = order_problems(logs)
        if problems:
            raise XferError(problems)
