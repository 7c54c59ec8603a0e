"""The vLLM worker extension: the `collective_rpc` face of `backends.vllm.engine`.

Create engines with ``worker_extension_cls="backends.vllm.worker.RefitWorkerExtension"`` (or
mix `RefitWorkerExtension` into your own extension class, since vLLM takes one); the
`Refitter` then drives them through ``collective_rpc`` (`refit.rpc.METHODS`). With vLLM's own
weight-transfer API no extension is needed: ``weight_transfer_config={"backend": "xfer"}``
(`backends.vllm.transfer`). Everything that crosses the call is JSON bytes.
"""

from __future__ import annotations

from typing import Any

from backends.vllm.engine import WORKAROUNDS, VllmRefitEngine

__all__ = ["WORKAROUNDS", "RefitWorkerExtension"]


class RefitWorkerExtension:
    """Mixed into vLLM's worker class; methods are called through ``collective_rpc``."""

    def _refit(self) -> VllmRefitEngine:
        native = getattr(self, "weight_transfer_engine", None)
        if hasattr(native, "core"):  # the "xfer" weight-transfer backend: one engine per worker
            return native.core  # type: ignore[no-any-return,union-attr]
        engine = getattr(self, "_refit_engine", None)
        if engine is None:
            runner = self.model_runner  # type: ignore[attr-defined]
            engine = VllmRefitEngine(
                self.vllm_config,  # type: ignore[attr-defined]
                runner.get_model,
                self.device,  # type: ignore[attr-defined]
                on_installed=getattr(runner, "reset_mm_cache", None),
            )
            self._refit_engine = engine
        return engine

    def refit_describe(self) -> bytes:
        return self._refit().refit_describe()

    def refit_connect(self, setup: bytes, installed: int = 0) -> None:
        self._refit().refit_connect(setup, installed)

    def refit_step(self, version: int, path: Any = None) -> bytes:
        return self._refit().refit_step(version, path)

    def refit_status(self) -> bytes:
        return self._refit().refit_status()

    def refit_set_options(
        self,
        workarounds: list[str],
        capture: bool,
        force_misc: list[str] | None = None,
        fault: tuple[str, str] | None = None,
    ) -> None:
        self._refit().refit_set_options(workarounds, capture, force_misc, fault)

    def refit_captured(self) -> bytes:
        return self._refit().refit_captured()

    def refit_state_dict(self) -> bytes:
        return self._refit().refit_state_dict()
