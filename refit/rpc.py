"""`RpcEngine`: an engine replica driven through ``collective_rpc`` (a vLLM ``LLM``).

The engine's workers run the project's worker extension (`backends.vllm_worker`), which
implements the methods named in `METHODS`; everything crossing the call is bytes (pickled
records), so it works in single-process and multiprocess engines alike. Duck-typed: any object
with ``collective_rpc(method, args=...)`` works, and nothing here imports vLLM.

After its ranks installed a refit, an engine still holds caches computed with the old weights:
vLLM's prefix cache serves KV blocks of earlier prompts, and its multimodal and encoder caches
keep outputs of the old encoder. `invalidate_caches` drops them all (running requests' KV
included, so a request in flight recomputes its prefix on the new weights); `RpcEngine.step`
calls it on every completed refit, before the refit counts as done.
"""

from __future__ import annotations

import pickle
from typing import Any

from refit.errors import RefitError
from refit.pending import Threaded
from refit.spec import EngineSpec, Pending

__all__ = ["METHODS", "RpcEngine", "invalidate_caches"]

METHODS = {
    "describe": "refit_describe",
    "connect": "refit_connect",
    "step": "refit_step",
    "status": "refit_status",
}


def invalidate_caches(llm: Any, *, name: str = "engine") -> None:
    """Drop every cache `llm` (a vLLM ``LLM`` or ``LLMEngine``) derived from its weights."""
    reset = getattr(llm, "reset_prefix_cache", None)
    if reset is None:
        raise RefitError(f"{name}: {type(llm).__name__} has no reset_prefix_cache")
    if reset(reset_running_requests=True) is False:
        raise RefitError(
            f"{name}: vLLM refused to reset its prefix cache after the refit; its KV cache may "
            "hold blocks computed with the old weights"
        )
    for owner in (llm, getattr(llm, "llm_engine", None)):
        for method in ("reset_mm_cache", "reset_encoder_cache"):
            fn = getattr(owner, method, None)
            if fn is not None:
                fn()


class RpcEngine:
    def __init__(self, llm: Any, *, name: str = "engine") -> None:
        if not hasattr(llm, "collective_rpc"):
            raise RefitError(f"{name}: {type(llm).__name__} has no collective_rpc")
        self.llm = llm
        self.name = name

    def _call(self, key: str, *args: Any) -> list[Any]:
        return list(self.llm.collective_rpc(METHODS[key], args=args))

    def describe(self) -> EngineSpec:
        try:
            raw = self._call("describe")
        except AttributeError as e:
            raise RefitError(
                f"{self.name}: the engine's workers do not implement {METHODS['describe']}; "
                "create the LLM with worker_extension_cls='backends.vllm_worker.RefitWorkerExtension'"
            ) from e
        specs = [pickle.loads(b) for b in raw]
        if any(s != specs[0] for s in specs[1:]):
            raise RefitError(f"{self.name}: the engine's ranks describe different parameters")
        return specs[0]

    def connect(self, setup: bytes) -> Pending:
        return Threaded(lambda: self._call("connect", setup), what=f"{self.name} connect")

    def step(self, version: int, path: str | None = None) -> Pending:
        def run() -> list[Any]:
            stats = [pickle.loads(b) for b in self._call("step", version, path)]
            invalidate_caches(self.llm, name=self.name)
            return stats

        return Threaded(run, what=f"{self.name} refit {version}")

    def status(self) -> list[Any]:
        return [pickle.loads(b) for b in self._call("status")]
