"""`RpcEngine`: an engine replica driven through ``collective_rpc`` (a vLLM ``LLM``).

The engine's workers run the project's worker extension (`backends.vllm.worker`), which
implements the methods named in `METHODS`; everything crossing the call is JSON bytes
(`xfer.wire`), so it works in single-process and multiprocess engines alike. Duck-typed: any object
with ``collective_rpc(method, args=...)`` works, and nothing here imports vLLM.

After its ranks installed a refit, an engine still holds caches computed with the old weights:
vLLM's prefix cache serves KV blocks of earlier prompts, and its multimodal and encoder caches
keep outputs of the old encoder. `invalidate_caches` drops them all (running requests' KV
included, so a request in flight recomputes its prefix on the new weights); `RpcEngine.step`
calls it on every completed refit, before the refit counts as done.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from refit.errors import RefitError
from refit.pending import Threaded
from refit.rank import RankStats
from refit.spec import EngineSpec, EngineStatus, Pending
from xfer.wire import WireError, loads

__all__ = [
    "METHODS",
    "RpcEngine",
    "decode_spec",
    "decode_stats",
    "decode_status",
    "invalidate_caches",
]

METHODS = {
    "describe": "refit_describe",
    "connect": "refit_connect",
    "step": "refit_step",
    "status": "refit_status",
}


def decode_stats(raw: bytes) -> RankStats:
    x = loads(raw, what="rank stats")
    if not isinstance(x, dict):
        raise WireError("rank stats: expected an object")
    return RankStats(**x)


def decode_spec(raw: list[bytes], name: str) -> EngineSpec:
    """One replica's description from every rank's (JSON); its ranks must agree."""
    specs = [EngineSpec.from_json(loads(b, what="engine description")) for b in raw]
    if not specs or any(s != specs[0] for s in specs[1:]):
        raise RefitError(f"{name}: the engine's ranks describe different parameters")
    return specs[0]


def decode_status(raw: bytes) -> EngineStatus:
    try:
        return EngineStatus.from_json(loads(raw, what="engine status"))
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"engine status: {e}") from None


def invalidate_caches(
    llm: Any, *, name: str = "engine", call: Callable[..., Any] | None = None
) -> None:
    """Drop every cache `llm` (a vLLM ``LLM`` or ``LLMEngine``, or a Ray actor handle of
    one) derived from its weights. `call(method, **kwargs)` invokes one of its methods
    (default: directly; for an actor handle: ``ray.get(method.remote(**kwargs))``)."""
    call = call or (lambda fn, **kw: fn(**kw))
    reset = getattr(llm, "reset_prefix_cache", None)
    if reset is None:
        raise RefitError(f"{name}: {type(llm).__name__} has no reset_prefix_cache")
    if call(reset, reset_running_requests=True) is False:
        raise RefitError(
            f"{name}: vLLM refused to reset its prefix cache after the refit; its KV cache may "
            "hold blocks computed with the old weights"
        )
    for owner in (llm, getattr(llm, "llm_engine", None)):
        for method in ("reset_mm_cache", "reset_encoder_cache"):
            fn = getattr(owner, method, None)
            if fn is not None:
                call(fn)


class RpcEngine:
    def __init__(self, llm: Any, *, name: str = "engine") -> None:
        if not hasattr(llm, "collective_rpc"):
            raise RefitError(f"{name}: {type(llm).__name__} has no collective_rpc")
        self.llm = llm
        self.name = name
        self.key = llm  # the same engine twice is refused (`Refitter`)

    def _call(self, key: str, *args: Any) -> list[Any]:
        return list(self.llm.collective_rpc(METHODS[key], args=args))

    def describe(self) -> EngineSpec:
        try:
            raw = self._call("describe")
        except AttributeError as e:
            raise RefitError(
                f"{self.name}: the engine's workers do not implement {METHODS['describe']}; "
                "create the LLM with worker_extension_cls='backends.vllm.worker.RefitWorkerExtension'"
            ) from e
        return decode_spec(raw, self.name)

    def connect(self, setup: bytes, installed: int = 0) -> Pending:
        return Threaded(
            lambda: self._call("connect", setup, installed), what=f"{self.name} connect"
        )

    def step(self, version: int, path: str | None = None) -> Pending:
        def run() -> list[Any]:
            stats = [decode_stats(b) for b in self._call("step", version, path)]
            invalidate_caches(self.llm, name=self.name)
            return stats

        return Threaded(run, what=f"{self.name} refit {version}")

    def status(self) -> list[EngineStatus]:
        return [decode_status(b) for b in self._call("status")]
