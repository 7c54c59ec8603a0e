"""The ``"xfer"`` backend of vLLM's own weight-transfer API.

After ``pip install`` of this project, vLLM loads `register` from the ``vllm.general_plugins``
entry point in every process, so ``vllm serve MODEL --weight-transfer-config
'{"backend": "xfer"}'`` and ``LLM(..., weight_transfer_config={"backend": "xfer"})`` create an
`XferWeightTransferEngine` in every worker; no worker extension is needed. A `Refitter` given
the engine (the ``LLM``, the server's base URL, or a vLLM weight-sync client: `refit.native`)
drives it through vLLM's public calls:

``init_weight_transfer_engine({"action": "describe", ...})``
    the worker writes its description (`EngineSpec` as JSON) into the refit's store, sealed
    with the refit's token; the driver reads it there (no custom route is needed).
``init_weight_transfer_engine({"action": "connect", "setup": ...})``
    the worker joins a refit generation (a `RankSetup` as JSON; the token comes with it over
    vLLM's own API, the trusted control channel).
``start_weight_update()`` / ``update_weights({"version": n})`` / ``finish_weight_update()``
    one refit: `update_weights` receives the bulk shards straight into the model's storage,
    loads misc tensors through vLLM's loaders and runs the post-load processing
    (`backends.vllm_engine`), then writes its `RankStats` and `EngineStatus` into the store.

All data the worker writes to the store is sealed JSON; everything it reads from the store
is checked (`refit.watch`, `xfer.wire`). Each worker's place: replica ``replica +
data_parallel_index`` (one ``vllm serve`` with data parallelism holds several replicas),
rank = its tensor-parallel rank.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from backends.vllm_engine import VllmRefitEngine
from refit.errors import RefitError
from xfer import tcp_store
from xfer.wire import loads, seal

__all__ = [
    "XferInitInfo",
    "XferUpdateInfo",
    "XferWeightTransferEngine",
    "engine_record_key",
    "register",
]

log = logging.getLogger(__name__)

BACKEND = "xfer"


def engine_record_key(prefix: str, what: str, replica: int, rank: int) -> str:
    """Where a worker writes its description, stats and status in the refit's store."""
    return f"{prefix}/engine/{what}/{replica}/{rank}"


def _base() -> tuple[Any, Any, Any]:
    from vllm.distributed.weight_transfer.base import (
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )

    return WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo


_Engine, _InitBase, _UpdateBase = _base()


@dataclass(kw_only=True)
class XferInitInfo(_InitBase):  # type: ignore[misc,valid-type]
    """What `init_weight_transfer_engine` carries (a plain dict over HTTP)."""

    action: str  # "describe" or "connect"
    store_host: str = ""
    store_port: int = 0
    prefix: str = ""  # the refit session's store keys
    token: str = ""  # hex
    replica: int = 0  # this engine's replica index (its data-parallel rank is added)
    timeout_s: float = 600.0
    setup: str = ""  # connect: a `RankSetup` as JSON
    installed: int = 0  # connect: the last refit the trainer completed


@dataclass(kw_only=True)
class XferUpdateInfo(_UpdateBase):  # type: ignore[misc,valid-type]
    version: int
    path: str | None = None


class XferWeightTransferEngine(_Engine):  # type: ignore[misc,valid-type]
    init_info_cls = XferInitInfo
    update_info_cls = XferUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: Any) -> None:
        super().__init__(config, vllm_config, device, model)
        self.core = VllmRefitEngine(vllm_config, lambda: self.model, device)
        self._store: Any = None
        self._prefix = ""
        self._token = b""
        self._replica = 0

    def _rank(self) -> int:
        return self.core._refit_tp()[0]

    def _put(self, what: str, value: Any) -> None:
        if self._store is None:
            return
        key = engine_record_key(self._prefix, what, self._replica, self._rank())
        self._store.set(key, seal(value, self._token, key))

    def init_transfer_engine(self, init_info: XferInitInfo) -> None:
        if init_info.action == "describe":
            try:
                self._store = tcp_store(
                    init_info.store_host,
                    init_info.store_port,
                    is_master=False,
                    timeout_s=init_info.timeout_s,
                )
            except (RuntimeError, OSError) as e:
                raise RefitError(
                    f"engine rank {self._rank()}: cannot reach the refit's store at "
                    f"{init_info.store_host}:{init_info.store_port} ({e})"
                ) from None
            self._prefix = init_info.prefix
            self._token = bytes.fromhex(init_info.token)
            dp = int(getattr(self.parallel_config, "data_parallel_index", 0) or 0)
            self._replica = init_info.replica + dp
            self._put("describe", loads(self.core.refit_describe()))
        elif init_info.action == "connect":
            self.core.refit_connect(init_info.setup.encode(), init_info.installed, self._replica)
            self._put("status", loads(self.core.refit_status()))
        else:
            raise RefitError(f"unknown init action {init_info.action!r}: describe or connect")

    def start_weight_update(self) -> None:
        """Nothing to prepare: a refit is one atomic step in `update_weights`."""

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # the base class would end with torch.accelerator.synchronize(); the refit already
        # joined its streams with this worker's current stream
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: XferUpdateInfo) -> None:
        try:
            stats = self.core.refit_step(update_info.version, update_info.path)
            self._put(f"stats/v{update_info.version}", loads(stats))
        finally:
            self._put("status", loads(self.core.refit_status()))

    def finish_weight_update(self) -> None:
        """Nothing left: the install finished inside `update_weights`."""

    def shutdown(self) -> None:
        self.core.close()


def register() -> None:
    """The ``vllm.general_plugins`` entry point: make ``"xfer"`` a weight-transfer backend
    (idempotent: vLLM loads plugins once per process, possibly in many processes)."""
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    except ImportError:  # a vLLM without the weight-transfer API
        return
    with contextlib.suppress(ValueError):  # registered already in this process
        WeightTransferEngineFactory.register_engine(
            BACKEND, "backends.vllm_transfer", "XferWeightTransferEngine"
        )
