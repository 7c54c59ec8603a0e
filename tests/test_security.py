"""What crosses the network is plain, authenticated data; hostile input is refused, not run.

The refit's store is reachable by anyone who reaches its port: records there are JSON sealed
with the refit's token, and a forged, garbled or pickled record is ignored and reported, never
deserialized as code. The store listens only on the address it was given. Bad options and
unreachable stores raise `RefitError`, not raw torch errors.
"""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path

import pytest

from refit import watch
from refit.errors import RefitError
from refit.refitter import Refitter
from refit.watch import Failure, FailureBoard, RefitFailed
from tests.support import listeners
from xfer import tcp_store, torch_private, wire


class _Boom:
    """Unpickling this writes a file: proof that nothing unpickles what the store holds."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("code ran",))


def test_forged_and_pickled_records_are_ignored_and_reported(tmp_path):
    store = tcp_store("127.0.0.1", 0, is_master=True)
    board = FailureBoard(store, "refit/x", b"the refit's token")
    hostile = tcp_store("127.0.0.1", store.port, is_master=False)
    marker = tmp_path / "pwned"
    # an attacker knows the keys (list_keys) but not the token
    hostile.add("refit/x/v1/n", 1)
    hostile.set("refit/x/v1/failure1", pickle.dumps(_Boom(str(marker))))
    hostile.add("refit/x/v1/n", 1)
    forged = wire.seal(Failure(0, "trainer", "transfer", "fake").to_json(), b"guess", "k")
    hostile.set("refit/x/v1/failure2", forged)
    hostile.set("refit/x/v1/outcome", wire.seal("ok", b"guess", "refit/x/v1/outcome"))
    assert board.read(1) == []  # nothing trusted
    assert not marker.exists()  # nothing unpickled
    assert len(board.ignored) == 2 and all("not" in m for m in board.ignored)
    # the interrupt does not stop a refit on forged records, and never blocks
    check = board.interrupt(1, time.monotonic() + 60, Failure(1, "engine", "", ""), lambda: "p")
    t0 = time.monotonic()
    check()
    assert time.monotonic() - t0 < 1
    # a real failure is still seen
    board.post(1, Failure(2, "engine", "transfer", "RuntimeError: real"))
    with pytest.raises(RefitFailed) as e:
        time.sleep(0.03)
        check()
    assert [f.message for f in e.value.failures] == ["RuntimeError: real"]


def test_a_counter_bumped_without_a_record_does_not_block_readers():
    store = tcp_store("127.0.0.1", 0, is_master=True)
    board = FailureBoard(store, "refit/y", b"token")
    store.add("refit/y/v3/n", 1000)  # a writer that died, or a hostile bump
    t0 = time.monotonic()
    assert board.read(3) == []
    assert time.monotonic() - t0 < 5


def test_the_commit_ignores_a_forged_ok_and_times_out_as_refit_failed():
    store = tcp_store("127.0.0.1", 0, is_master=True)
    board = FailureBoard(store, "refit/z", b"token")
    store.set("refit/z/v1/outcome", wire.seal("ok", b"wrong", "refit/z/v1/outcome"))
    store.add("refit/z/v1/done", 5)  # claims everyone is done
    me = Failure(0, "trainer", "", "")
    with pytest.raises(RefitFailed) as e:
        board.commit(1, 0, 2, time.monotonic() + 0.5, me)  # rank 1 never commits
    assert "timed out waiting for its peers" in str(e.value)


def test_the_commit_reads_every_done_record_and_refuses_a_forged_one():
    store = tcp_store("127.0.0.1", 0, is_master=True)
    boards = [FailureBoard(store, "refit/d", b"token") for _ in range(2)]
    me = [Failure(r, "trainer", "", "") for r in range(2)]
    # two ranks commit together: both return
    t = threading.Thread(target=boards[1].commit, args=(1, 1, 2, time.monotonic() + 10, me[1]))
    t.start()
    boards[0].commit(1, 0, 2, time.monotonic() + 10, me[0])
    t.join()
    # a done record for rank 1 not sealed with the token, and the counter at 2: rank 0 waits
    # for an authentic one until its deadline, and reports the forgery
    store.set("refit/d/v2/done1", wire.seal("done", b"wrong", "refit/d/v2/done1"))
    store.add("refit/d/v2/done", 1)
    with pytest.raises(RefitFailed, match="timed out waiting for its peers"):
        boards[0].commit(2, 0, 2, time.monotonic() + 0.5, me[0])
    assert boards[0].ignored


def test_a_waiting_rank_looks_again_sooner_the_fewer_the_ranks(monkeypatch):
    # the pause between looks doubles from 0.5 ms to a cap that grows with the world: 2 ms
    # for a few local ranks, POLL_S where hundreds of ranks poll one store
    assert watch.commit_poll_s(2) == watch.commit_poll_s(8) == 0.002
    assert watch.commit_poll_s(40) == pytest.approx(0.01)
    assert watch.commit_poll_s(80) == watch.commit_poll_s(1280) == watch.POLL_S
    store = tcp_store("127.0.0.1", 0, is_master=True)
    boards = [FailureBoard(store, "refit/p", b"token") for _ in range(2)]
    me = [Failure(r, "trainer", "", "") for r in range(2)]
    pauses: list[float] = []

    def sleep(s: float) -> None:  # rank 1 commits (last, so at once) after rank 0's 8th look
        pauses.append(s)
        if len(pauses) == 8:
            boards[1].commit(1, 1, 2, time.monotonic() + 10, me[1])

    monkeypatch.setattr(watch.time, "sleep", sleep)
    boards[0].commit(1, 0, 2, time.monotonic() + 10, me[0])
    assert pauses == [0.0005, 0.001] + [0.002] * 6


def test_the_store_listens_only_on_the_chosen_address():
    store = tcp_store("127.0.0.1", 0, is_master=True)
    assert listeners(store.port) == {"0100007F"}  # 127.0.0.1, no wildcard, no IPv6


def test_vllm_private_names_are_there_and_a_rename_is_caught(monkeypatch):
    import vllm

    from backends.vllm import private as vllm_private

    vllm_private.check()  # vLLM as installed has every private name the install uses
    assert vllm.__version__.startswith(vllm_private.TESTED_VLLM)
    mod = vllm_private._layerwise()
    monkeypatch.delattr(mod, "_place_kernel_tensors")
    with pytest.raises(RuntimeError, match=r"lacks \['vllm\..*\._place_kernel_tensors'\]"):
        vllm_private.check()


def test_torch_private_names_are_there():
    # fails when a torch upgrade moves the private names TorchComm needs
    torch_private.check()
    import torch

    assert torch.__version__.startswith(torch_private.TESTED_TORCH)


def test_refit_failed_survives_pickling_as_ray_sends_it():
    e = RefitFailed(4, [Failure(1, "trainer", "transfer", "boom")], note="x")
    back = pickle.loads(pickle.dumps(e))
    assert isinstance(back, RefitFailed) and back.version == 4 and back.failures == e.failures
    assert str(back) == str(e)


class _Stub:
    """Stands for an engine handle in checks that happen before any call is made."""

    def collective_rpc(self, *a, **k):
        raise AssertionError("no call expected")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"timeout_s": 0}, "timeout_s must be a positive number of seconds, got 0"),
        ({"timeout_s": -1.5}, "got -1.5"),
        ({"backend": "mpi"}, "backend must be one of"),
        ({"path": "fast"}, "path must be one of"),
        ({"staging_bytes": 1000}, "staging_bytes=1000 leaves buckets"),
        ({"receive_while_serving": True}, "receive_while_serving=True needs delta=True"),
        (
            {"receive_while_serving": True, "delta": True},
            r"engine replicas 0 \(RpcEngine\) cannot receive while they serve",
        ),
        ({"delta": True, "path": "golden"}, "delta=True moves bytes on path 'p2p'"),
        ({"full_every": -1}, "full_every must be an int >= 0"),
        ({"baselines": "disk"}, "baselines must be one of"),
        ({"part_bytes": -1}, r"part_bytes must be None \(bucket / 64\) or an int >= 0"),
        ({"part_bytes": 1.5}, "part_bytes must be None .* got 1.5"),
    ],
)
def test_bad_options_raise_refit_error(kwargs, needle):
    with pytest.raises(RefitError, match=needle):
        Refitter(object(), _Stub(), **kwargs)  # type: ignore[arg-type]


def test_the_same_engine_twice_is_refused_at_once():
    llm = _Stub()
    with pytest.raises(RefitError, match=r"engine replicas \[1\] repeat an earlier replica"):
        Refitter(object(), [llm, llm])  # type: ignore[arg-type]


def test_an_unreachable_store_is_a_refit_error():
    import socket

    from refit.rank import RefitRank
    from refit.setup import RankOptions, RankSetup
    from refit.spec import EngineSpec, TrainerSpec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    setup = RankSetup(
        "127.0.0.1", port, "p", "00" * 16, 0, TrainerSpec(1, ((0,),), ()), EngineSpec(1, ()),
        1, RankOptions(timeout_s=1.0),
    )  # fmt: skip
    with pytest.raises(RefitError, match=f"cannot reach the refit's store at 127.0.0.1:{port}"):
        RefitRank(setup)


def test_the_backend_follows_where_the_tensors_live():
    from refit.refitter import choose_backend

    assert choose_backend("auto", "cuda", "cuda") == "nccl"
    assert choose_backend("auto", "cpu", "cpu") == "gloo"
    with pytest.raises(RefitError, match="trainer's tensors are on cuda but the engine's on cpu"):
        choose_backend("auto", "cuda", "cpu")
    with pytest.raises(RefitError, match="gloo send/recv does not take CUDA tensors"):
        choose_backend("gloo", "cuda", "cuda")
    with pytest.raises(RefitError, match="NCCL needs CUDA"):
        choose_backend("nccl", "cpu", "cpu")


def test_m2n_is_not_chosen_past_its_fan_in_and_fan_out_limits():
    import torch

    from xfer import Layout, Mesh, ReshardItem, Shard, m2n

    def item(n_src: int, n_dst: int) -> ReshardItem:
        src = Layout(Mesh(list(range(n_src)), ("s",)), [Shard(0)], (4096, 8))
        dst = Layout(Mesh(list(range(n_src, n_src + n_dst)), ("d",)), [Shard(1)], (4096, 8))
        return ReshardItem(src, dst, torch.float32, "w")

    assert m2n._fan(item(16, 2)) is None
    assert "fed by 32 source shards" in m2n._fan(item(32, 2))
    assert m2n._fan(item(2, 8)) is None
