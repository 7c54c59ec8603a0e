"""The strict comm enforces NCCL's rules on CPU, and the GPU waits and stream joins follow them.

Every multi-rank xfer test runs over `xfer.strict.StrictComm` (the session's rank pool wraps
every comm), so the kernel is held to NCCL's rules on gloo. Here: each rule catches the bug it
is there for (a wait on a helper thread, a buffer touched before its wait, two communicators
used in different orders), and the GPU-only code paths (NCCL waits in `TorchComm`, stream
joins in `NcclComm`, m2n and the refit runtime) are checked with a recording CUDA double,
since no CUDA runs here.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from harness.local import RankError
from xfer import Layout, Mesh, Resharder, ReshardItem, Shard, Transfer, XferError
from xfer.execute import run_p2p
from xfer.strict import StrictComm, order_problems


def _ring(comm):
    """One message to the next rank, from the previous one."""
    n, r = comm.size, comm.rank
    send = torch.full((4,), float(r))
    recv = torch.zeros(4)
    return [Transfer((r + 1) % n, send)], [Transfer((r - 1) % n, recv)], send, recv


def read_before_wait(comm):
    sends, recvs, _, recv = _ring(comm)
    work = comm.send_recv(sends, recvs)
    early = recv.clone()
    work.wait()
    return early.view(torch.uint8).tolist(), recv.tolist()


def test_receives_land_only_when_waited(ranks):
    for r, (early, late) in enumerate(ranks.run(read_before_wait, 2)):
        assert set(early) == {0xA5}  # poison until wait()
        assert late == [float((r - 1) % 2)] * 4


def write_recv_before_wait(comm):
    sends, recvs, _, recv = _ring(comm)
    work = comm.send_recv(sends, recvs)
    recv.zero_()
    work.wait()


def change_send_before_wait(comm):
    sends, recvs, send, _ = _ring(comm)
    work = comm.send_recv(sends, recvs)
    send.add_(1)
    work.wait()


def wait_on_helper_thread(comm):
    sends, recvs, _, _ = _ring(comm)
    work = comm.send_recv(sends, recvs)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(work.wait).result()


def never_wait(comm):
    sends, recvs, _, _ = _ring(comm)
    comm.send_recv(sends, recvs)


@pytest.mark.parametrize(
    ("fn", "needle"),
    [
        (write_recv_before_wait, "a receive buffer [4] torch.float32 was written before wait()"),
        (change_send_before_wait, "a send buffer [4] torch.float32 changed before wait()"),
        (wait_on_helper_thread, "wait() called on another thread"),
        (never_wait, "1 operations were never waited"),
    ],
)
def test_each_rule_catches_its_bug(ranks, fn, needle):
    with pytest.raises(RankError) as e:
        ranks.run(fn, 2, timeout=30)
    assert needle in str(e.value)


class _HelperThreadWaits:
    """A comm whose works are waited on a helper thread: the bug of waiting NCCL works
    away from the consumer, reintroduced above the strict comm."""

    def __init__(self, inner):
        self.inner = inner
        self.pool = ThreadPoolExecutor(1)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def send_recv(self, sends, recvs, *, stream=None):
        work = self.inner.send_recv(sends, recvs, stream=stream)

        class W:
            def wait(_self):
                self.pool.submit(work.wait).result()

        return W()


def p2p_waiting_on_a_helper(comm):
    mesh_a, mesh_b = Mesh([0], ("a",)), Mesh([1], ("b",))
    it = ReshardItem(Layout(mesh_a, [Shard(0)], (8,)), Layout(mesh_b, [Shard(0)], (8,)),
                     torch.float32, "w")  # fmt: skip
    rs = Resharder([it], comm)
    src = torch.arange(8.0) if comm.rank == 0 else None
    dst = torch.zeros(8) if comm.rank == 1 else None
    run_p2p(rs.program, [src], [dst], _HelperThreadWaits(comm))


def test_an_executor_waiting_on_a_helper_thread_is_caught(ranks):
    with pytest.raises(RankError) as e:
        ranks.run(p2p_waiting_on_a_helper, 2, timeout=30)
    assert "wait() called on another thread" in str(e.value)


def two_comms_in_rank_order(comm, port):
    """Ranks post on two communicators, rank 0 in one order and rank 1 in the other: the
    deadlock of engine ranks driving stage communicators from threads."""
    from xfer import TorchComm, tcp_store

    store = tcp_store("127.0.0.1", port, is_master=False)
    other = StrictComm(
        TorchComm.create(store, comm.rank, comm.size, prefix=f"other{port}"),
        name="other",
        log=comm.log,
    )
    order = [comm, other] if comm.rank == 0 else [other, comm]
    # gloo does not deadlock on this (NCCL may): post both, then wait both
    works = [c.broadcast(torch.zeros(4), 0) for c in order]
    for w in works:
        w.wait()
    other.close()


def test_communicators_used_in_different_orders_are_caught(ranks):
    from xfer import tcp_store

    store = tcp_store("127.0.0.1", 0, is_master=True)
    with pytest.raises(RankError) as e:
        ranks.run(two_comms_in_rank_order, 2, store.port, timeout=60)
    assert "use their communicators in different orders" in str(e.value)


def test_order_problems_compares_shared_communicators_only():
    a = [("x", "send_recv", ""), ("y", "broadcast", "root 0 4 B")]
    b = [("x", "send_recv", ""), ("x", "send_recv", ""), ("y", "broadcast", "root 0 4 B")]
    assert order_problems([a, b]) == []  # more posts on x, same order of communicators
    c = [("y", "broadcast", "root 0 4 B"), ("x", "send_recv", "")]
    assert "different orders" in order_problems([a, c])[0]
    d = [("x", "send_recv", ""), ("y", "broadcast", "root 1 4 B")]
    assert "different collectives on y" in order_problems([a, d])[0]


def test_two_threads_posting_on_one_communicator_are_caught():
    class Idle:
        rank, size, device = 0, 2, torch.device("cpu")

    comm = StrictComm(Idle(), name="c")  # type: ignore[arg-type]
    comm._posting.acquire()  # another thread is posting
    try:
        with pytest.raises(XferError, match="posted to by two threads at once"):
            comm.send_recv([], [Transfer(1, torch.zeros(2))])
    finally:
        comm._posting.release()


# -- the GPU code paths, with a recording CUDA double -----------------------------------------
class FakeStream:
    """Records the stream joins a CUDA stream would make (CUDA cannot run here)."""

    def __init__(self, name, log):
        self.name, self.log = name, log
        self.device = torch.device("cpu")
        self.cuda_stream = 0

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")

    def wait_event(self, event):
        self.log.append(f"{self.name} waits event of {event.stream}")

    def __eq__(self, other):
        return isinstance(other, FakeStream) and other.name == self.name

    def __hash__(self):
        return hash(self.name)


class FakeCuda:
    """`torch.cuda.current_stream` per thread, `Event` and `stream()` contexts, recorded."""

    def __init__(self, monkeypatch):
        self.log: list[str] = []
        self.current = threading.local()
        main = FakeStream("main", self.log)
        fake = self

        class Event:
            def __init__(self):
                self.stream = None

            def record(self, stream):
                self.stream = stream.name
                fake.log.append(f"event on {stream.name}")

            def query(self):
                return True

        class StreamCtx:
            def __init__(self, s):
                self.s = s

            def __enter__(self):
                self.prev = fake.now()
                fake.current.s = self.s

            def __exit__(self, *a):
                fake.current.s = self.prev

        self.main = main
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: fake.now())
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "stream", StreamCtx)

    def now(self):
        return getattr(self.current, "s", self.main)


def test_nccl_comm_orders_a_side_stream_after_the_current_one(monkeypatch):
    from xfer import nccl_comm

    cuda = FakeCuda(monkeypatch)

    class FakeNccl:
        class group:
            def __enter__(self):
                cuda.log.append("group")

            def __exit__(self, *a):
                cuda.log.append("group end")

    class Communicator:
        rank, nranks = 0, 2

        def send(self, t, peer, stream):
            cuda.log.append(f"send to {peer}")

        def recv(self, t, peer, stream):
            cuda.log.append(f"recv from {peer}")

    monkeypatch.setattr(nccl_comm, "_nccl", lambda: FakeNccl)
    comm = nccl_comm.NcclComm.__new__(nccl_comm.NcclComm)
    comm.communicator, comm._rank, comm._size = Communicator(), 0, 2
    comm._device, comm.interrupt = torch.device("cpu"), None
    side = FakeStream("side", cuda.log)
    work = comm.send_recv([Transfer(1, torch.zeros(2))], [Transfer(1, torch.zeros(2))], stream=side)
    # the side stream waits for what the current stream wrote before NCCL reads or writes
    assert cuda.log[:3] == ["side waits main", "group", "send to 1"]
    assert cuda.log[-1] == "event on side"
    work.wait()  # the consumer (the current stream) waits, not the side stream
    assert cuda.log[-1] == "main waits event of side"


def test_torch_comm_waits_nccl_works_on_the_calling_thread(ranks):
    from xfer import TorchComm

    comm = TorchComm.__new__(TorchComm)
    comm._nccl, comm.interrupt = True, None
    polls: list[str] = []
    comm.interrupt = lambda: polls.append("poll")

    class Work:
        def __init__(self):
            self.n, self.waited_on = 0, None

        def is_completed(self):
            self.n += 1
            return self.n > 2  # completes while the caller polls

        def wait(self):
            self.waited_on = threading.get_ident()

    works = [Work(), Work()]
    comm._wait(works)
    assert all(w.waited_on == threading.get_ident() for w in works)
    assert polls  # the host polled (and could be interrupted) instead of blocking


def test_refit_transfer_stream_joins_the_callers_stream_both_ways(monkeypatch):
    from refit.rank import RefitRank

    cuda = FakeCuda(monkeypatch)
    rank = RefitRank.__new__(RefitRank)
    rank.device = torch.device("cpu")
    rank.stream = FakeStream("side", cuda.log)
    with rank._transfer_stream():
        assert cuda.now().name == "side"  # the transfer runs on the side stream
        cuda.log.append("transfer")
    assert cuda.log == ["side waits main", "transfer", "main waits side"]


def test_receive_while_serving_installs_on_the_pausing_threads_stream(monkeypatch):
    # receiving runs on a thread of its own while vLLM serves on its worker stream; once the
    # engine is paused, the install must run on that worker stream (as it would on the
    # worker's own thread), the transfer side stream joined with it both ways
    import types

    from refit.rank import Gate, RefitRank
    from refit.setup import RankOptions
    from xfer import Baselines

    cuda = FakeCuda(monkeypatch)
    worker = FakeStream("worker", cuda.log)
    seen: list[tuple[str, str]] = []

    class Resharder:
        staging = types.SimpleNamespace(nbytes=0)

        def run(self, srcs, dsts, path=None, delta=None):
            seen.append(("receive", cuda.now().name))
            assert delta is not None and delta.receive_only
            return types.SimpleNamespace(wire_bytes_received=0, bytes_sent=0)

        def apply(self, dsts, baselines):
            seen.append(("apply", cuda.now().name))

    class Hooks:
        extra_bytes = 0

        def begin(self, version):
            seen.append(("begin", cuda.now().name))

        def load(self, tensors):
            seen.append(("load", cuda.now().name))

        def finish(self, version):
            seen.append(("finish", cuda.now().name))

    rank = RefitRank.__new__(RefitRank)
    rank.rank, rank.device, rank.role = 1, torch.device("cpu"), "engine"
    rank.stream = FakeStream("side", cuda.log)
    rank.options = RankOptions(delta=True)
    rank.plan = types.SimpleNamespace(items=[], bulk=0, misc=[])
    rank.resharder, rank.baselines = Resharder(), Baselines()
    rank.board = types.SimpleNamespace(ignored=[])
    rank._expected, rank._since_dense, rank._interrupt = None, 0, None
    rank.on_phase, rank._phase = None, "setup"
    gate = Gate()
    result: list = []
    helper = threading.Thread(
        target=lambda: result.append(rank._engine_step_gated(Hooks(), 1, "p2p", gate))
    )
    helper.start()
    assert gate.arrived.wait(5)  # received while the worker thread went on serving
    gate.stream = worker  # what `VllmRefitEngine.refit_step` hands over, then:
    gate.paused.set()
    helper.join(5)
    assert result and result[0].phases["paused"] <= result[0].seconds
    assert seen == [
        ("receive", "side"),  # the helper thread's own stream joined with the side stream
        ("begin", "worker"),
        ("apply", "side"),
        ("load", "worker"),
        ("finish", "worker"),
    ]
    assert cuda.log[-2:] == ["side waits worker", "worker waits side"]
