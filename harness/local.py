"""`RankPool`: long-lived local rank processes joined by gloo over 127.0.0.1.

For tests, benchmarks and trying the kernel on one machine. Starting a process and importing
torch costs seconds, so the pool spawns its workers once and reuses them. `RankPool.run(fn, world, *args)` builds a fresh gloo group of `world` ranks for
the call (new store prefix, so calls never share a group), runs ``fn(comm, *args)`` on ranks
``0..world-1``, and returns their results in rank order. If any rank raises, `run` raises
`RankError` with every rank's traceback; if any rank does not answer within `timeout`, the
pool is torn down (and rebuilt on next use) and `run` raises `TimeoutError`: a hang fails the
call instead of hanging the caller. `fn` must be importable (a module-level function).
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import multiprocessing.connection
import os
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

HOST = "127.0.0.1"


class RankError(RuntimeError):
    def __init__(self, failures: dict[int, str], results: list[Any]) -> None:
        self.failures = failures
        self.results = results
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
        super().__init__(f"{len(failures)} rank(s) failed:\n{text}")


def _worker(rank: int, conn: Any, port: int, threads: int, strict: bool) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)
    from xfer.comm import TorchComm, tcp_store
    from xfer.strict import StrictComm

    store = tcp_store(HOST, port, is_master=False)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        fn, args, world, prefix, timeout_s = task
        comm: Any = None
        try:
            comm = TorchComm.create(store, rank, world, prefix=prefix, timeout_s=timeout_s)
            if strict:
                comm = StrictComm(comm, name=prefix)
            result = fn(comm, *args)
            if strict:
                comm.check_order()  # every rank got here: their posts are compared
            conn.send(("ok", result))
        except BaseException as e:  # report everything, including assertion errors
            conn.send(("err", (e, "".join(traceback.format_exception(e)))))
        finally:
            if comm is not None:
                comm.close()


class RankPool:
    def __init__(self, size: int = 8, *, threads: int = 1, strict: bool = False) -> None:
        self.size = size
        self.threads = threads
        self.strict = strict  # wrap every comm in `xfer.strict.StrictComm`
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._store: Any = None
        self._calls = itertools.count()

    def _start(self) -> None:
        from xfer.comm import tcp_store

        self._store = tcp_store(HOST, 0, is_master=True)
        ctx = mp.get_context("spawn")
        for r in range(self.size):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_worker,
                args=(r, child, self._store.port, self.threads, self.strict),
                daemon=True,
            )
            p.start()
            self._procs.append(p)
            self._conns.append(parent)

    def run(
        self, fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120
    ) -> list[Any]:
        if world > self.size:
            raise ValueError(f"world {world} > pool size {self.size}")
        if not self._procs:
            self._start()
        prefix = f"call{next(self._calls)}"
        for r in range(world):
            self._conns[r].send((fn, args, world, prefix, timeout))
        results: list[Any] = [None] * world
        failures: dict[int, str] = {}
        errors: dict[int, BaseException] = {}
        deadline = time.monotonic() + timeout + 5
        pending = set(range(world))
        while pending:
            left = deadline - time.monotonic()
            ready = mp.connection.wait([self._conns[r] for r in pending], timeout=max(0, left))
            if not ready:
                self.close()
                raise TimeoutError(f"ranks {sorted(pending)} did not finish within {timeout} s")
            for conn in ready:
                assert isinstance(conn, Connection)
                r = self._conns.index(conn)
                pending.discard(r)
                try:
                    status, value = conn.recv()
                except (EOFError, OSError) as e:
                    failures[r] = f"the rank process died ({type(e).__name__})"
                    continue
                if status == "ok":
                    results[r] = value
                else:
                    errors[r], failures[r] = value
        if failures:
            err = RankError(failures, results)
            err.errors = errors  # type: ignore[attr-defined]
            raise err
        return results

    def close(self) -> None:
        for c in self._conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                c.send(None)
        for p in self._procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
        self._procs.clear()
        self._conns.clear()
        self._store = None
