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
    (`backends.vllm.engine`), then writes its `RankStats` and `EngineStatus` into the store.

All data the worker writes to the store is sealed JSON; everything it reads from the store
is checked (`refit.watch`, `xfer.wire`). Each worker's place: replica ``replica +
data_parallel_index``, rank = its tensor-parallel rank.

The trainer side, `XferTrainerWeightTransferEngine`, follows vLLM's trainer API: every trainer
rank calls ``trainer_init(XferTrainerInitInfo(...), client=..., source=ShardSource(...))`` and
then ``send_weights()`` every step. Every rank opens the refit's store (rank 0 serves it on
``master_address:master_port``) and writes its description there; rank 0 drives a `Refitter`
over the trainer ranks (`StoreTrainers`) and the engine behind `client`, and tells the other
ranks through the store, before each send, which refit version and which generation of the
communicator it is (so after a failure every rank reconnects to the same one). The token in
the init info authenticates every record: give every rank the same init info over the
trainer's own trusted channel (`make_trainer_init_info` makes one).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from backends.vllm.engine import VllmRefitEngine
from refit.errors import RefitError
from xfer import tcp_store
from xfer.wire import loads, seal

__all__ = [
    "ShardSource",
    "StoreTrainers",
    "XferInitInfo",
    "XferTrainerInitInfo",
    "XferTrainerWeightTransferEngine",
    "XferUpdateInfo",
    "XferWeightTransferEngine",
    "engine_record_key",
    "make_trainer_init_info",
    "register",
]

log = logging.getLogger(__name__)

BACKEND = "xfer"


def engine_record_key(prefix: str, what: str, replica: int, rank: int) -> str:
    """Where a worker writes its description, stats and status in the refit's store."""
    return f"{prefix}/engine/{what}/{replica}/{rank}"


def _base() -> tuple[Any, ...]:
    from vllm.distributed.weight_transfer.base import (
        ParamMeta,
        TrainerInitInfo,
        TrainerWeightTransferEngine,
        WeightSource,
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )

    return (
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
        TrainerWeightTransferEngine,
        TrainerInitInfo,
        WeightSource,
        ParamMeta,
    )


_Engine, _InitBase, _UpdateBase, _TrainerEngine, _TrainerInitBase, _Source, _Meta = _base()


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
    # "install": the whole refit now; "receive": start it and return, the bytes arriving
    # while the engine serves (a "received/v<version>" record says when), then "install"
    phase: str = "install"


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
        version = update_info.version
        if update_info.phase == "receive":
            self.core.refit_receive(
                version, update_info.path, lambda: self._put(f"received/v{version}", {})
            )
            return
        if update_info.phase != "install":
            raise RefitError(f"unknown update phase {update_info.phase!r}: receive or install")
        try:
            stats = self.core.refit_step(update_info.version, update_info.path)
            self._put(f"stats/v{update_info.version}", loads(stats))
        finally:
            self._put("status", loads(self.core.refit_status()))

    def finish_weight_update(self) -> None:
        """Nothing left: the install finished inside `update_weights`."""

    def shutdown(self) -> None:
        self.core.close()


# -- the trainer side ------------------------------------------------------------------------
@dataclass(kw_only=True)
class XferTrainerInitInfo(_TrainerInitBase):  # type: ignore[misc,valid-type]
    """The same on every trainer rank, except `rank`."""

    backend: ClassVar[str] = BACKEND
    master_address: str  # rank 0 serves the refit's store here (reachable by every rank)
    master_port: int
    token: str  # hex secret, authenticates every record in the store
    world_size: int  # trainer ranks
    timeout_s: float = 600.0
    path: str = "auto"
    bucket_bytes: int = 256 << 20
    verify: bool = False
    strict: bool = False
    install: str = "auto"
    pause: str | None = "wait"  # vLLM's pause mode around each install of a server


def make_trainer_init_info(
    world_size: int, master_address: str = "127.0.0.1", master_port: int = 0, **options: Any
) -> dict[str, Any]:
    """An init info (as a dict: add ``rank=`` per rank) with a fresh token and, with port 0,
    a free port on `master_address`. Hand it to every rank over a trusted channel."""
    import secrets

    from backends.ray_trainer import free_port

    return {
        "master_address": master_address,
        "master_port": master_port or free_port(),
        "token": secrets.token_hex(32),
        "world_size": world_size,
        **options,
    }


class ShardSource(_Source):  # type: ignore[misc,valid-type]
    """A trainer rank's HF-named shards: DTensors or `xfer.DTensorRef`s (transformers-5 fused
    expert tensors are split into views, `backends.torch.trainer.canonical_refs`), each on
    the pipeline stage whose ranks hold it (`stage_ranks`; default one stage of all ranks).
    Refit sends shards, never full tensors: iterating it is refused."""

    def __init__(self, params: Any, *, stage_ranks: Any = None) -> None:
        from backends.torch.trainer import canonical_refs

        self.refs = canonical_refs(params)
        self.stage_ranks = stage_ranks

    def metadata(self) -> list[Any]:
        return [
            _Meta(
                name, ref.local.dtype if ref.local is not None else torch.float32, ref.layout.shape
            )
            for name, ref in self.refs.items()
        ]

    def __iter__(self) -> Any:
        raise RefitError("the xfer backend sends each rank's shards; it never gathers tensors")


class StoreTrainers:
    """`refit.spec.TrainerSide` for rank 0 of a trainer whose ranks meet in the refit's store
    (not in Ray): descriptions, setups and per-send instructions are sealed records there."""

    def __init__(self, engine: XferTrainerWeightTransferEngine) -> None:
        self.e = engine

    def describe(self) -> Any:
        from backends.torch.trainer import merge_descriptions
        from refit.spec import SourceParam

        parts = []
        for r in range(self.e.info.world_size):
            x = self.e.read(f"trainer/{r}")
            params = [SourceParam.from_json(p) for p in x["params"]]
            parts.append((tuple(tuple(s) for s in x["stages"]), params, x["device"]))
        return merge_descriptions(parts)

    def connect(self, setup: bytes) -> Any:
        from refit.pending import Threaded

        self.e.write(f"setup/{self.e.refitter.generation}", setup.decode())
        return Threaded(lambda: [self.e.join(setup)], what="trainer rank 0 connect")

    def step(self, version: int, path: str | None = None) -> Any:
        from refit.pending import Threaded

        return Threaded(lambda: [self.e.own_step(version, path)], what=f"trainer refit {version}")


class XferTrainerWeightTransferEngine(_TrainerEngine):  # type: ignore[misc,valid-type]
    init_info_cls = XferTrainerInitInfo

    def __init__(self, info: XferTrainerInitInfo, client: Any, source: ShardSource) -> None:
        super().__init__(client=client, source=source, is_sender=info.rank == 0)
        self.info = info
        self._token = bytes.fromhex(info.token)
        self._prefix = "xfer-trainer"
        self._sends = 0
        self._generation = 0
        self.rank_runtime: Any = None
        self.refitter: Any = None
        stages = source.stage_ranks or [list(range(info.world_size))]
        self.store = tcp_store(
            info.master_address,
            info.master_port,
            is_master=self.is_sender,
            timeout_s=info.timeout_s,
        )
        from backends.torch.trainer import rank_description

        stage_ranks, params, device = rank_description(source.refs, stages, info.rank)
        self.write(
            f"trainer/{info.rank}",
            {
                "stages": [list(s) for s in stage_ranks],
                "params": [p.to_json() for p in params],
                "device": device,
            },
        )

    # -- records in the store ---------------------------------------------------------------
    def write(self, what: str, value: Any) -> None:
        key = f"{self._prefix}/{what}"
        self.store.set(key, seal(value, self._token, key))

    def read(self, what: str) -> Any:
        import time

        from xfer.wire import unseal

        key = f"{self._prefix}/{what}"
        deadline = time.monotonic() + self.info.timeout_s
        while not self.store.check([key]):
            if time.monotonic() > deadline:
                raise RefitError(f"trainer rank {self.info.rank}: no {what} record in the store")
            time.sleep(0.01)
        return unseal(self.store.get(key), self._token, key)

    # -- the rank's own part ------------------------------------------------------------------
    def join(self, setup: bytes) -> None:
        from refit.rank import RefitRank
        from refit.setup import RankSetup

        if self.rank_runtime is not None:
            self.rank_runtime.close()
        s = RankSetup.from_json(setup).for_rank(self.info.rank)
        device = next(
            (r.local.device for r in self.source.refs.values() if r.local is not None),
            torch.device("cpu"),
        )
        self.rank_runtime = RefitRank(s, device=device)

    def own_step(self, version: int, path: str | None) -> Any:
        def local(name: str) -> Any:
            return self.source.refs[name].local

        return self.rank_runtime.trainer_step(local, path, version)

    @classmethod
    def trainer_init(
        cls, init_info: XferTrainerInitInfo, *, client: Any, source: Any = None
    ) -> XferTrainerWeightTransferEngine:
        if not isinstance(source, ShardSource):
            raise RefitError("the xfer backend needs a ShardSource (each rank's shards)")
        engine = cls(init_info, client, source)
        if engine.is_sender:
            from refit.refitter import Refitter

            engine.refitter = Refitter(
                StoreTrainers(engine),
                client,
                path=init_info.path,  # type: ignore[arg-type]
                bucket_bytes=init_info.bucket_bytes,
                host=init_info.master_address,
                timeout_s=init_info.timeout_s,
                verify=init_info.verify,
                strict=init_info.strict,
                install=init_info.install,
                store=engine.store,
                token=engine._token,
                pause=init_info.pause,
            )
        return engine

    def send_weights(self) -> None:
        """One refit: every rank sends its shards; rank 0 also drives the engine."""
        self._sends += 1
        if self.is_sender:
            r = self.refitter
            generation = r.generation + (0 if r._connected else 1)
            self.write(f"send/{self._sends}", {"version": r.version + 1, "generation": generation})
            try:
                r.refit()
            except RefitError as e:
                if r.generation < generation:  # failed before any rank was told to connect
                    self.write(f"setup/{generation}", {"error": str(e)})
                raise
            return
        order = self.read(f"send/{self._sends}")
        if order["generation"] != self._generation or self.rank_runtime.broken:
            self._generation = order["generation"]
            setup = self.read(f"setup/{self._generation}")
            if isinstance(setup, dict):  # rank 0 could not prepare the refit
                raise RefitError(f"trainer rank 0 could not prepare the refit: {setup['error']}")
            self.join(str(setup).encode())
        self.own_step(int(order["version"]), None)

    def shutdown(self) -> None:
        if self.rank_runtime is not None:
            self.rank_runtime.close()


def register() -> None:
    """The ``vllm.general_plugins`` entry point: make ``"xfer"`` a weight-transfer backend
    (idempotent: vLLM loads plugins once per process, possibly in many processes)."""
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    except ImportError:  # a vLLM without the weight-transfer API
        return
    with contextlib.suppress(ValueError):  # registered already in this process
        WeightTransferEngineFactory.register_engine(
            BACKEND, "backends.vllm.transfer", "XferWeightTransferEngine"
        )
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    with contextlib.suppress(ValueError):
        WeightTransferTrainerFactory.register_engine(
            BACKEND, "backends.vllm.transfer", "XferTrainerWeightTransferEngine"
        )
