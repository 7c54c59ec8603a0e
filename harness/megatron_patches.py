"""The patches megatron-core 0.16.1 needs to build and run a model on a machine without CUDA.

Everything else in the Megatron backend runs unchanged on CPU (gloo) and GPU (NCCL); these
patches are the whole difference, applied once per process by `apply()` and only when
``torch.cuda.is_available()`` is false. Each says what it replaces and why.
"""

from __future__ import annotations

import torch

__all__ = ["apply", "applied", "seed"]

_APPLIED = False


def applied() -> bool:
    return _APPLIED


def apply() -> bool:
    """Patch megatron-core for CPU use when there is no CUDA; True if patched (now or before)."""
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available():
        return False
    _APPLIED = True

    # torch.cuda.current_device(): about forty call sites pass its result as `device=` (router
    # buffers, rotary frequencies, token-dispatch masks, the expert bias, the RNG tracker).
    # A CPU-only torch raises there; answering "cpu" puts every such allocation on the CPU.
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]

    # Tensor.cuda(): with tied embeddings over several pipeline stages, the language model
    # moves the shared weight and its all-reduce buffer with `.cuda()`. Without CUDA that
    # raises; leaving the tensor where it is matches `.cuda()` on a tensor already in place.
    def _stay(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return self

    torch.Tensor.cuda = _stay  # type: ignore[method-assign,assignment]

    # moe_utils.te_general_gemm is bound only inside `try: import transformer_engine`; the
    # router's forward tests `te_general_gemm is not None` and raises NameError without TE.
    # Binding it to None selects the plain torch matmul the router has for that case.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # multi_latent_attention.HAVE_TE: without TE, megatron's TE extension module stands in
    # mocks, so MLA's `from ...transformer_engine import TELinear` succeeds, HAVE_TE is set
    # and a later `isinstance(..., TELinear)` raises TypeError (TELinear is a mock instance).
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = False
    return True


def seed(value: int) -> None:
    """Megatron's RNG set-up (`model_parallel_cuda_manual_seed`). Its tracker records CUDA
    RNG states per parallel group, which a CPU-only torch cannot give; where `apply()`
    patched, the inference tracker is used instead (it records nothing: with
    CPU initialization every weight comes from the default CPU RNG, seeded by the caller)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(value, inference_rng_tracker=_APPLIED, force_reset_rng=True)
