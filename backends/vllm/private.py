"""The private vLLM names the install needs, in one place, checked against the vLLM version.

vLLM 0.32's public layerwise-reload API (`initialize_layerwise_reload`,
`finalize_layerwise_reload`, `get_layerwise_info`, `materialize_layer`) restores a model to
checkpoint format and back, but three steps of an install that writes only some modules have
no public name: giving a materialized parameter its original weight loader back (so misc
tensors load through vLLM's own loaders), copying a processed module into the kernel tensors
the model runs with (so captured CUDA graphs stay valid), and putting the kernel tensors back
on an aborted install. They are the module-private functions below; `LayerReloadingInfo`'s
``loaded_weights`` / ``load_numel`` fields are cleared on abort.

`check()` raises a clear error naming every name the installed vLLM lacks; the test suite calls
it, so a vLLM upgrade that renames one fails a test instead of an install.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "TESTED_VLLM",
    "check",
    "clear_loaded",
    "copy_and_restore_kernel_tensors",
    "original_loader",
    "place_kernel_tensors",
]

TESTED_VLLM = ("0.32",)
_LAYERWISE = "vllm.model_executor.model_loader.reload.layerwise"
_NAMES = ("_get_original_loader", "_copy_and_restore_kernel_tensors", "_place_kernel_tensors")
_FIELDS = ("loaded_weights", "load_numel")


def _layerwise() -> Any:
    import importlib

    return importlib.import_module(_LAYERWISE)


def check() -> None:
    """Raise `RuntimeError` naming every private vLLM name the install needs that is missing."""
    import dataclasses

    import vllm

    try:
        mod = _layerwise()
    except ImportError as e:
        raise RuntimeError(f"vLLM {vllm.__version__} has no {_LAYERWISE} ({e})") from None
    missing = [f"{_LAYERWISE}.{n}" for n in _NAMES if not callable(getattr(mod, n, None))]
    info_cls = getattr(mod, "LayerReloadingInfo", None)
    fields = (
        {f.name for f in dataclasses.fields(info_cls)}
        if info_cls is not None and dataclasses.is_dataclass(info_cls)
        else set(getattr(info_cls, "__annotations__", {}))
    )
    missing += [f"LayerReloadingInfo.{f}" for f in _FIELDS if f not in fields]
    if missing:
        raise RuntimeError(
            f"vLLM {vllm.__version__} lacks {missing}, which the refit install needs (tested "
            f"with vLLM {', '.join(TESTED_VLLM)})"
        )


def original_loader(param: Any) -> Any:
    """The weight loader vLLM gave `param` before layerwise reload wrapped it."""
    return _layerwise()._get_original_loader(param)


def copy_and_restore_kernel_tensors(layer: Any, info: Any) -> None:
    """Copy a processed module into the kernel tensors the model runs with."""
    _layerwise()._copy_and_restore_kernel_tensors(layer, info)


def place_kernel_tensors(layer: Any, info: Any) -> None:
    """Point a module back at its (untouched) kernel tensors."""
    _layerwise()._place_kernel_tensors(layer, info)


def clear_loaded(info: Any) -> None:
    """Forget what a layer loaded during an aborted reload."""
    info.loaded_weights.clear()
    info.load_numel = 0
