"""`NativeEngine`: an engine replica driven through vLLM's own weight-transfer API.

The engine runs the ``"xfer"`` weight-transfer backend (`backends.vllm.transfer`): a
``vllm serve`` started with ``--weight-transfer-config '{"backend": "xfer"}'``, or an
``LLM``/engine built with ``weight_transfer_config={"backend": "xfer"}``. The driver speaks
vLLM's public calls only, duck-typed (nothing here imports vLLM):

* a *weight-sync client*: anything with ``init_weight_transfer_engine(init_info)``,
  ``start_weight_update()``, ``update_weights(update_info)``, ``finish_weight_update(
  weight_version=)`` (vLLM's ``HTTPVLLMWeightSyncClient``, ``RayVLLMWeightSyncClient``);
* the base URL of a running ``vllm serve`` (`HttpClient`, the RL routes; the server runs with
  ``VLLM_SERVER_DEV_MODE=1``, which mounts them);
* an in-process ``LLM`` (`OfflineClient` adapts its methods), or an ``AsyncLLM`` (`AsyncClient`
  runs its coroutines on its own event loop).

Descriptions, per-rank stats and statuses come back through the refit's store, sealed with
the refit's token (`attach` tells the engine where the store is). Around each install the
driver keeps generation away from half-installed weights and from caches of the old ones: a
server is paused (``/pause?mode=...&clear_cache=true``) and resumed; an ``LLM`` (no requests
run during a blocking call) gets its prefix cache reset after the install.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from refit.errors import RefitError
from refit.pending import Threaded
from refit.rank import RankStats
from refit.spec import EngineSpec, EngineStatus, Pending
from xfer.wire import WireError, unseal

__all__ = ["AsyncClient", "HttpClient", "NativeEngine", "OfflineClient", "as_client", "is_native"]

PAUSE_MODES = ("keep", "wait", "abort")


class HttpClient:
    """vLLM's RL routes on a running ``vllm serve`` (standard library only)."""

    def __init__(self, base_url: str, *, timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, route: str, body: Any = None, query: str = "") -> Any:
        url = f"{self.base_url}/{route}" + (f"?{query}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:2000]
            raise RefitError(f"{method} {url}: HTTP {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            raise RefitError(f"{method} {url}: {e.reason}") from None
        return json.loads(raw) if raw else None

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._call("POST", "init_weight_transfer_engine", {"init_info": init_info})

    def start_weight_update(self) -> None:
        self._call("POST", "start_weight_update")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._call("POST", "update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        body = None if weight_version is None else {"weight_version": weight_version}
        self._call("POST", "finish_weight_update", body)

    def pause(self, mode: str) -> None:
        self._call("POST", "pause", query=urllib.parse.urlencode({"mode": mode}))

    def resume(self) -> None:
        self._call("POST", "resume")

    def reset_caches(self) -> None:
        """Drop every cache computed with the old weights (vLLM's dev routes, mounted with
        ``VLLM_SERVER_DEV_MODE=1`` like the RL routes): the pause clears the prefix cache only
        in ``wait``/``abort`` modes, and only before the install."""
        q = urllib.parse.urlencode({"reset_running_requests": "true"})
        out = self._call("POST", "reset_prefix_cache", query=q)
        if isinstance(out, dict) and out.get("success") is False:
            raise RefitError(
                f"{self.base_url}: the server refused to reset its prefix cache after the refit; "
                "its KV cache may hold blocks computed with the old weights"
            )
        self._call("POST", "reset_mm_cache")
        self._call("POST", "reset_encoder_cache")

    def weight_version(self) -> str:
        return str(self._call("GET", "weight_info")["weight_version"])


class OfflineClient:
    """An in-process ``LLM`` as a weight-sync client (its methods take request records)."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)

    def reset_caches(self) -> None:
        from refit.rpc import invalidate_caches

        invalidate_caches(self.llm)

    def weight_version(self) -> str:
        return str(self.llm.get_weight_version())


@dataclass
class _Request:
    """What vLLM's ``WeightTransferInitRequest`` / ``WeightTransferUpdateRequest`` carry."""

    init_info: dict[str, Any] | None = None
    update_info: dict[str, Any] | None = None


class AsyncClient:
    """An ``AsyncLLM`` as a weight-sync client. Its coroutines run on the event loop the
    ``AsyncLLM`` lives on (the loop running when the `Refitter` was made); call
    ``refit()`` from another thread, e.g. ``await asyncio.to_thread(refitter.refit)``."""

    def __init__(self, engine: Any) -> None:
        import asyncio

        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RefitError(
                "an AsyncLLM is driven on its own event loop: make the Refitter inside that "
                "loop and call refit() from another thread (await asyncio.to_thread(...))"
            ) from None
        self.engine = engine

    def _run(self, coro: Any) -> Any:
        import asyncio

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            coro.close()
            raise RefitError("refit() was called on the AsyncLLM's event loop; use a thread")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._run(self.engine.init_weight_transfer_engine(_Request(init_info=init_info)))

    def start_weight_update(self) -> None:
        self._run(self.engine.start_weight_update())

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._run(self.engine.update_weights(_Request(update_info=update_info)))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._run(self.engine.finish_weight_update(weight_version))

    def pause(self, mode: str) -> None:
        self._run(self.engine.pause_generation(mode=mode, clear_cache=True))

    def resume(self) -> None:
        self._run(self.engine.resume_generation())


class RayClient:
    """vLLM's `RayVLLMWeightSyncClient` (engines as Ray actors), plus dropping the caches
    computed with the old weights on every actor after an install (its own client leaves
    them: a prompt asked again would reuse KV of the old weights)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.handles = list(client.handles)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.client.init_weight_transfer_engine(init_info)

    def start_weight_update(self) -> None:
        self.client.start_weight_update()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.client.update_weights(update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.client.finish_weight_update(weight_version)

    def reset_caches(self) -> None:
        import ray

        from refit.rpc import invalidate_caches

        def call(method: Any, **kwargs: Any) -> Any:
            return ray.get(method.remote(**kwargs))

        for i, h in enumerate(self.handles):
            invalidate_caches(h, name=f"engine actor {i}", call=call)


def _backend_of(llm: Any) -> str | None:
    engine = getattr(llm, "llm_engine", llm)
    cfg = getattr(getattr(engine, "vllm_config", None), "weight_transfer_config", None)
    return getattr(cfg, "backend", None)


def _is_async(x: Any) -> bool:
    import inspect

    return inspect.iscoroutinefunction(getattr(x, "update_weights", None))


def is_native(x: Any) -> bool:
    """Whether `x` is driven through vLLM's weight-transfer API (`as_client` takes it)."""
    if isinstance(x, str):
        return x.startswith(("http://", "https://"))
    if _backend_of(x) is not None:
        return _backend_of(x) == "xfer"
    return all(
        hasattr(x, m)
        for m in ("init_weight_transfer_engine", "start_weight_update", "update_weights")
    ) and not hasattr(x, "llm_engine")  # a weight-sync client


def as_client(x: Any) -> Any:
    if isinstance(x, str):
        return HttpClient(x)
    base_url = getattr(x, "base_url", None)
    if isinstance(base_url, str):  # vLLM's HTTPVLLMWeightSyncClient: the same routes, + pause
        return HttpClient(base_url, timeout=float(getattr(x, "timeout", 600.0)))
    if _backend_of(x) == "xfer":
        return AsyncClient(x) if _is_async(x) else OfflineClient(x)
    if isinstance(getattr(x, "handles", None), list):  # vLLM's RayVLLMWeightSyncClient
        return RayClient(x)
    return x


class NativeEngine:
    """`EngineSide` over one engine replica's weight-sync client (see the module docstring).

    `pause` is vLLM's pause mode used around each install of a server: ``wait`` (requests in
    flight finish on the old weights, new ones wait for the new weights), ``keep`` (requests
    in flight are frozen and resume on the new weights, their prefix recomputed), ``abort``,
    or None (do not pause: only for servers nobody sends requests to during a refit)."""

    def __init__(self, engine: Any, *, name: str = "engine", pause: str | None = "wait") -> None:
        if pause is not None and pause not in PAUSE_MODES:
            raise RefitError(f"pause must be one of {PAUSE_MODES} or None, got {pause!r}")
        self.client = as_client(engine)
        self.key = engine if not isinstance(engine, str) else self.client.base_url
        self.name = name
        self.pause = pause
        self.replica = 0
        self._store: Any = None
        self._prefix = ""
        self._token = b""
        self._timeout = 600.0
        self._world = 0
        self.receive_while_serving = False  # see `attach`

    def attach(
        self,
        store: Any,
        host: str,
        prefix: str,
        token: bytes,
        replica: int,
        *,
        timeout_s: float = 600.0,
        receive_while_serving: bool = False,
    ) -> None:
        """Where the refit's store is, which replica index this engine starts at, how long
        a refit may take, and whether its bytes arrive while the engine serves."""
        self._store, self._host, self._prefix = store, host, prefix
        self._token, self.replica = token, replica
        self._timeout = timeout_s
        self.receive_while_serving = receive_while_serving

    def _key(self, what: str, replica: int, rank: int) -> str:
        return f"{self._prefix}/engine/{what}/{replica}/{rank}"

    def _read(self, what: str, replica: int, rank: int, deadline: float) -> Any:
        key = self._key(what, replica, rank)
        while not self._store.check([key]):
            if time.monotonic() > deadline:
                raise RefitError(
                    f"{self.name}: no {what} record from replica {replica} rank {rank}"
                )
            time.sleep(0.01)
        try:
            return unseal(self._store.get(key), self._token, key)
        except WireError as e:
            raise RefitError(f"{self.name}: {e}") from None

    def node_addresses(self) -> list[str]:
        """A server's host (a remote server means ranks on another machine)."""
        url = getattr(self.client, "base_url", None)
        return [urllib.parse.urlparse(url).hostname or ""] if isinstance(url, str) else []

    def describe(self) -> EngineSpec:
        if self._store is None:
            raise RefitError(f"{self.name}: attach() the refit's store first")
        self.client.init_weight_transfer_engine(
            {
                "action": "describe",
                "store_host": self._host,
                "store_port": int(self._store.port),
                "prefix": self._prefix,
                "token": self._token.hex(),
                "replica": self.replica,
            }
        )
        deadline = time.monotonic() + 60
        first = EngineSpec.from_json(self._read("describe", self.replica, 0, deadline))
        specs = [first] + [
            EngineSpec.from_json(self._read("describe", self.replica, k, deadline))
            for k in range(1, first.world)
        ]
        if any(s != first for s in specs[1:]):
            raise RefitError(f"{self.name}: the engine's ranks describe different parameters")
        self._world = first.world
        return first

    def connect(self, setup: bytes, installed: int = 0) -> Pending:
        info = {"action": "connect", "setup": setup.decode(), "installed": installed}
        return Threaded(
            lambda: self.client.init_weight_transfer_engine(info), what=f"{self.name} connect"
        )

    def step(self, version: int, path: str | None = None) -> Pending:
        def run() -> list[RankStats]:
            if self.receive_while_serving and path != "golden":
                # the bytes arrive while the engine serves: start the refit, wait until every
                # rank of the replica has them (each posts a record), then pause to install
                self.client.start_weight_update()
                self.client.update_weights({"version": version, "path": path, "phase": "receive"})
                self.client.finish_weight_update()
                deadline = time.monotonic() + self._timeout
                for k in range(self._world):
                    self._read(f"received/v{version}", self.replica, k, deadline)
            paused = False
            t0 = time.perf_counter()
            if self.pause is not None and hasattr(self.client, "pause"):
                self.client.pause(self.pause)
                paused = True
            try:
                self.client.start_weight_update()
                self.client.update_weights({"version": version, "path": path})
                self.client.finish_weight_update(weight_version=str(version))
                if hasattr(self.client, "reset_caches"):
                    self.client.reset_caches()
            finally:
                if paused:
                    self.client.resume()
            held = time.perf_counter() - t0  # the engine served nothing new meanwhile
            deadline = time.monotonic() + 30
            stats = [
                RankStats(**self._read(f"stats/v{version}", self.replica, k, deadline))
                for k in range(self._world)
            ]
            for s in stats:
                s.phases["paused"] = held
            return stats

        return Threaded(run, what=f"{self.name} refit {version}")

    def status(self) -> list[EngineStatus]:
        deadline = time.monotonic() + 10
        return [
            EngineStatus.from_json(self._read("status", self.replica, k, deadline))
            for k in range(self._world)
        ]
