"""What every trainer backend shares: a rank's refit methods and a Ray group of ranks.

`TrainerRankBase` is the refit half of one trainer rank process: `refit_connect` joins the
refit's communicator, `refit_step` sends the rank's shards for one refit (its subclass says
where a shard of an HF name is, `local`), `set_fault` injects faults in test processes
(`backends.fault_injection`), `call` runs any function with the rank object. `RayTrainerGroup` drives such ranks as Ray actors, one per
rank, and is the `TrainerSide` a `Refitter` takes (subclasses add `describe`).
`RayPending` waits for one call on every rank and names each rank that failed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any, Protocol

import torch

from backends import fault_injection
from refit.errors import RefitError
from refit.rank import RefitRank
from refit.rpc import decode_stats
from refit.setup import RankSetup
from xfer.segments import Local
from xfer.wire import dumps

__all__ = ["RayPending", "RayTrainerGroup", "TrainerRankBase", "free_port"]


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TrainerRankBase:
    """The refit methods of one trainer rank (mixed into the backend's rank class)."""

    rank: int
    _refit: RefitRank | None = None
    _fault: tuple[str, str] | None = None

    def local(self, name: str) -> Local:
        """This rank's shard of HF parameter `name` (a view of its live weights)."""
        raise NotImplementedError

    def weights(self) -> Iterator[torch.Tensor]:
        """Every tensor of the rank's live weights (the "mutate" fault changes them)."""
        raise NotImplementedError

    def before_step(self) -> None:
        """Called before every refit's transfer (e.g. to gather misc tensors)."""

    def device(self) -> torch.device:
        return torch.device("cpu")

    def refit_connect(self, setup: bytes) -> None:
        if self._refit is not None:
            self._refit.close()
            self._refit = None
        s = RankSetup.from_json(setup)
        self._refit = RefitRank(s.for_rank(self.rank), device=self.device())

    def refit_step(self, version: int, path: Any = None) -> bytes:
        if self._refit is None:
            raise RefitError(f"trainer rank {self.rank}: refit_step before refit_connect")
        hook = None
        if self._fault and self._fault[0] == "forget-baselines":
            self._refit.baselines.reset()  # as a rank restarted behind the driver's back
            self._fault = None
        elif self._fault and self._fault[0] == "mutate":
            hook = self._mutate_at(self._fault[1])
        elif self._fault:
            hook = fault_injection.hook(*self._fault)
        self._refit.on_phase = hook
        self.before_step()
        return dumps(asdict(self._refit.trainer_step(self.local, path, version)))

    def set_fault(self, kind: str | None, phase: str = "") -> None:
        """Fault injection for tests (processes started with ``REFIT_FAULT_INJECTION=1``;
        refused otherwise): `backends.fault_injection.hook(kind, phase)` on every refit, or
        ``"mutate"``: change this rank's weights in place when `phase` starts (as an
        optimizer step racing a refit would), or ``"forget-baselines"``: drop this rank's
        delta baselines before the next refit (once). None clears it."""
        if kind and not fault_injection.enabled():
            raise RefitError(
                f"trainer rank {self.rank}: fault injection is disabled in this process (set "
                f"{fault_injection.ENV}=1 in test processes)"
            )
        self._fault = (kind, phase) if kind else None

    def _mutate_at(self, at: str) -> Callable[[str], None]:
        def hook(phase: str) -> None:
            if at in phase:
                with torch.no_grad():
                    for t in self.weights():
                        if t.is_floating_point():
                            t.mul_(1.5)

        return hook

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self, *args)


class RayPending:
    """Ray object refs of one call on every rank (`labels` name them in errors)."""

    def __init__(
        self,
        refs: list[Any],
        *,
        what: str,
        decode: bool = False,
        labels: Sequence[str] | None = None,
    ) -> None:
        self.refs = refs
        self.what = what
        self.decode = decode
        self.labels = list(labels) if labels else [f"{what} [{i}]" for i in range(len(refs))]

    def wait(self, timeout: float | None = None) -> list[Any]:
        """Every result; on the first failure, give the other ranks a moment to stop too
        and raise one error naming every rank that failed (a dead process as such)."""
        import time

        import ray

        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(self.refs)
        results: dict[Any, Any] = {}
        errors: dict[Any, BaseException] = {}
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                late = [self.labels[self.refs.index(r)] for r in pending]
                raise RefitError(f"{self.what}: {late} did not finish within {timeout} s")
            self._collect(ready, results, errors)
            if errors:
                more, _ = ray.wait(pending, num_returns=len(pending), timeout=0.5)
                self._collect(more, results, errors)
                raise RefitError(
                    [f"{self.labels[self.refs.index(r)]}: {_why(e)}" for r, e in errors.items()]
                )
        out = [results[r] for r in self.refs]
        return [decode_stats(x) for x in out] if self.decode else out

    @staticmethod
    def _collect(
        refs: list[Any], results: dict[Any, Any], errors: dict[Any, BaseException]
    ) -> None:
        import ray

        for ref in refs:
            try:
                results[ref] = ray.get(ref)
            except Exception as e:  # report each rank's failure
                errors[ref] = e


def _node_address(_rank: Any = None) -> str:
    import ray

    return str(ray.util.get_node_ip_address())


def _why(e: BaseException) -> str:
    import ray

    if isinstance(e, ray.exceptions.ActorDiedError):
        if "creation task" in str(e):  # its constructor raised: say what
            return f"the rank failed to start: {_last_exception(str(e))}"
        return "the rank's process died (ActorDiedError)"
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(e).__name__}: {e}"


def _last_exception(text: str) -> str:
    """The last exception (type, message and what follows) of a Ray traceback text."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line[:1].isalpha() and ": " in line]
    return "\n".join(lines[starts[-1] :]) if starts else lines[-1] if lines else text


class Launch(Protocol):
    """How a group's ranks were started (a frozen record of the launch arguments): starts
    rank `rank` again the same way, for `restart_rank`."""

    def start(self, rank: int) -> Any: ...


class RayTrainerGroup:
    """Ray actors running a `TrainerRankBase` subclass, one per trainer rank. Subclasses
    implement `describe`; a group made by its class's `launch` keeps the `Launch` record."""

    def __init__(
        self,
        actors: Sequence[Any],
        launch: Launch | None = None,
        *,
        method_prefix: str = "",
    ) -> None:
        """`actors`: one per trainer rank, in rank order. `method_prefix`: prepended to every
        method this group calls (``describe``, ``refit_connect``, ``refit_step``, ``call``),
        for frameworks that fuse several roles into one actor and prefix their methods."""
        self.actors = list(actors)
        self._launch = launch  # how `launch` started them, to restart one
        self.prefix = method_prefix

    def _remote(self, actor: Any, method: str) -> Any:
        return getattr(actor, self.prefix + method).remote

    def restart_rank(self, rank: int) -> None:
        """Replace trainer rank `rank` (dead or alive) by a fresh actor started the same way;
        the next refit reconnects it."""
        import ray

        if self._launch is None:
            raise RefitError("restart_rank needs a group made by its class's launch()")
        ray.kill(self.actors[rank], no_restart=True)
        self.actors[rank] = self._launch.start(rank)

    def connect(self, setup: bytes) -> RayPending:
        return RayPending(
            [self._remote(a, "refit_connect")(setup) for a in self.actors],
            what="trainer connect",
            labels=self._labels(),
        )

    def step(self, version: int, path: str | None = None) -> RayPending:
        return RayPending(
            [self._remote(a, "refit_step")(version, path) for a in self.actors],
            what=f"trainer refit {version}",
            decode=True,
            labels=self._labels(),
        )

    def _labels(self) -> list[str]:
        return [f"trainer rank {r}" for r in range(len(self.actors))]

    def run(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every rank's actor; waits for all, naming ranks that fail."""
        return RayPending(
            [self._remote(a, method)(*args) for a in self.actors],
            what=method,
            labels=self._labels(),
        ).wait()

    def node_addresses(self) -> list[str]:
        """The IP address of the node each rank runs on."""
        return self.call(_node_address)

    def call(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """``fn(rank_object, *args)`` on every rank (e.g. a training step); waits for all."""
        return self.run("call", fn, *args)

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
