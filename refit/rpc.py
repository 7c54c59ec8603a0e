"""`RpcEngine`: an engine replica driven through ``collective_rpc`` (a vLLM ``LLM``).

The engine's workers run the project's worker extension (`backends.vllm_worker`), which
implements the methods named in `METHODS`; everything crossing the call is bytes (pickled
records), so it works in single-process and multiprocess engines alike. Duck-typed: any object
with ``collective_rpc(method, args=...)`` works, and nothing here imports vLLM.
"""

from __future__ import annotations

import pickle
from typing import Any

from refit.errors import RefitError
from refit.pending import Threaded
from refit.spec import EngineSpec, Pending

__all__ = ["METHODS", "RpcEngine"]

METHODS = {
    "describe": "refit_describe",
    "connect": "refit_connect",
    "step": "refit_step",
    "status": "refit_status",
}


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
        return Threaded(
            lambda: [pickle.loads(b) for b in self._call("step", version, path)],
            what=f"{self.name} refit {version}",
        )

    def status(self) -> list[Any]:
        return [pickle.loads(b) for b in self._call("status")]
