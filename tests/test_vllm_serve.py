"""A real ``vllm serve`` with the ``"xfer"`` weight-transfer backend, refitted over HTTP.

The server is started the way users start it (``--weight-transfer-config '{"backend":
"xfer"}'``, vLLM's RL routes mounted by ``VLLM_SERVER_DEV_MODE=1``) and the `Refitter` gets
only its base URL. Per step, after a p2p refit: greedy generation through the OpenAI-compatible
``/v1/completions`` equals HF transformers on the trainer's new weights (long prompts, prefix
caching on, so stale KV would show), ``/weight_info`` reports the refit's version; after a
golden refit of the same weights, ``/weight_checker``'s checksums equal the p2p ones. A
completion request in flight while a refit runs finishes on the old weights or the new ones,
never a mix (the refit pauses the server in ``wait`` mode).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TOKENS = 6


def _hf(path: str, prompts):
    from harness.reference import hf_generate

    return hf_generate(path, prompts, TOKENS)


def _same(got, want) -> bool:
    return all(g[0] == h[0] for g, h in zip(got, want, strict=True)) and all(
        abs(a - b) < 1e-4
        for g, h in zip(got, want, strict=True)
        for a, b in zip(g[1], h[1], strict=True)
    )


def _generate_into(server, out: list) -> None:
    from harness.reference import PROMPTS

    out.append(server.generate(PROMPTS[:1], 24))


def _refit_over_http(tmp_path: Path, model: str, tp: int, trainer_kind: str) -> dict:
    import ray

    from harness.hf_checkpoint import load_grouped, save_grouped
    from harness.reference import PROMPTS, set_step
    from harness.serve import Server
    from harness.tiny_models import build, step_weights
    from refit.refitter import Refitter

    overrides = {"num_key_value_heads": 2} if trainer_kind == "megatron" else {}
    path = str(tmp_path / model)
    config = build(model, path, overrides=overrides)
    base = load_grouped(path)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    out: dict = {"steps": []}
    try:
        if trainer_kind == "torch":
            from backends.torch.trainer import TorchTrainerGroup
            from harness.torch_shards import checkpoint_shards

            trainer = TorchTrainerGroup.launch(2, checkpoint_shards, path, 1, 2)
        else:
            from backends.parallel import Parallel
            from harness.megatron_actors import MegatronTrainerGroup

            trainer = MegatronTrainerGroup.launch(2, config, Parallel(tp=2))
        with Server(path, tp=tp, log=tmp_path / "serve.log") as server:
            refitter = Refitter(trainer, server.url, strict=True, timeout_s=120)
            assert _same(server.generate(PROMPTS, TOKENS), _hf(path, PROMPTS))  # warm the cache
            for step in (1, 2):
                if trainer_kind == "torch":
                    trainer.call(set_step, path, step)
                else:
                    trainer.load_hf(path, step)
                d = str(tmp_path / f"step{step}")
                save_grouped(step_weights(base, step), config, d)
                old = server.generate(PROMPTS[:1], TOKENS)
                racing: list = []
                t = threading.Thread(target=_generate_into, args=(server, racing))
                t.start()
                stats = refitter.refit(path="p2p")
                t.join()
                want = _hf(d, PROMPTS)
                got = server.generate(PROMPTS, TOKENS)
                version = server.weight_version()
                p2p_sums = server.checksums()
                refitter.refit(path="golden")
                out["steps"].append(
                    {
                        "tokens_equal": _same(got, want),
                        "version": version,
                        "refit_version": stats.version,
                        "seconds": stats.seconds,
                        "bulk_bytes": stats.bulk_bytes,
                        "checksums_equal": server.checksums() == p2p_sums,
                        "racing_prefix": racing[0][0][0][:TOKENS] if racing else None,
                        "old": old[0][0],
                        "new": want[0][0],
                    }
                )
    finally:
        ray.shutdown()
    return out


def _check(out: dict) -> None:
    assert len(out["steps"]) == 2
    for s in out["steps"]:
        assert s["tokens_equal"], s
        assert s["version"] == str(s["refit_version"]), s  # /weight_info follows the refits
        assert s["checksums_equal"], s  # p2p and golden leave the same weights
        assert s["bulk_bytes"] > 0
        # the request in flight saw the old weights or the new ones, not a mix
        assert s["racing_prefix"] in (s["old"], s["new"]), s


@pytest.mark.parametrize("tp", [1, 2])
def test_torch_trainer_refits_vllm_serve_over_http(tmp_path, tp):
    _check(_refit_over_http(tmp_path, "qwen3_moe", tp, "torch"))


def test_megatron_trainer_refits_vllm_serve_over_http(tmp_path):
    _check(_refit_over_http(tmp_path, "qwen3", 1, "megatron"))


class _TrainerRank:
    """A trainer rank of the user's own (a Ray actor here) using vLLM's trainer API."""

    def __init__(self, rank: int, world: int, path: str, engine, info: dict) -> None:
        # `engine`: a server's base URL, or a list holding the handle of an LLM Ray actor
        from vllm.distributed.weight_transfer import (
            HTTPVLLMWeightSyncClient,
            RayVLLMWeightSyncClient,
        )

        from backends.vllm.transfer import (
            ShardSource,
            XferTrainerInitInfo,
            XferTrainerWeightTransferEngine,
        )
        from harness.torch_shards import checkpoint_shards

        self.rank = rank
        self.source = ShardSource(checkpoint_shards(rank, world, path, 1, world))
        self.engine = XferTrainerWeightTransferEngine.trainer_init(
            XferTrainerInitInfo(**info, rank=rank),
            client=HTTPVLLMWeightSyncClient(engine)
            if isinstance(engine, str)
            else RayVLLMWeightSyncClient(engine[0]),
            source=self.source,
        )

    def train(self, path: str, step: int) -> None:
        from harness.reference import set_step

        self.params = self.source.refs
        set_step(self, path, step)

    def send_weights(self) -> None:
        self.engine.send_weights()


def test_vllm_trainer_api_with_the_xfer_backend(tmp_path):
    """vLLM's own trainer API: every rank calls trainer_init and send_weights."""
    import ray

    from backends.vllm.transfer import make_trainer_init_info
    from harness.hf_checkpoint import load_grouped, save_grouped
    from harness.reference import PROMPTS
    from harness.serve import Server
    from harness.tiny_models import build, step_weights

    path = str(tmp_path / "qwen3_moe")
    config = build("qwen3_moe", path)
    base = load_grouped(path)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with Server(path, log=tmp_path / "serve.log") as server:
            info = make_trainer_init_info(2, strict=True, timeout_s=120)
            actor = ray.remote(num_cpus=0.5)(_TrainerRank)
            ranks = [actor.remote(r, 2, path, server.url, info) for r in range(2)]
            for step in (1, 2):
                ray.get([a.train.remote(path, step) for a in ranks])
                ray.get([a.send_weights.remote() for a in ranks])
                d = str(tmp_path / f"step{step}")
                save_grouped(step_weights(base, step), config, d)
                assert _same(server.generate(PROMPTS, TOKENS), _hf(d, PROMPTS)), step
                assert server.weight_version() == str(step)
    finally:
        ray.shutdown()


def test_vllm_trainer_api_with_an_llm_ray_actor(tmp_path):
    """vLLM's trainer API with its Ray client: the engine is an `LLM` in a Ray actor."""
    import ray
    from vllm import LLM, SamplingParams

    from backends.vllm.ray_engine import engine_kwargs
    from backends.vllm.transfer import make_trainer_init_info
    from harness.hf_checkpoint import load_grouped, save_grouped
    from harness.reference import PROMPTS
    from harness.tiny_models import build, step_weights

    path = str(tmp_path / "qwen3_moe")
    config = build("qwen3_moe", path)
    base = load_grouped(path)
    kwargs = engine_kwargs(path, config) | {"weight_transfer_config": {"backend": "xfer"}}
    kwargs.pop("worker_extension_cls")
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        llm = ray.remote(num_cpus=1)(LLM).remote(**kwargs)
        info = make_trainer_init_info(2, strict=True, timeout_s=120)
        actor = ray.remote(num_cpus=0.5)(_TrainerRank)
        ranks = [actor.remote(r, 2, path, [llm], info) for r in range(2)]
        greedy = SamplingParams(temperature=0, max_tokens=TOKENS)
        for step in (1, 2):
            ray.get([a.train.remote(path, step) for a in ranks])
            ray.get([a.send_weights.remote() for a in ranks])
            d = str(tmp_path / f"step{step}")
            save_grouped(step_weights(base, step), config, d)
            outs = ray.get(llm.generate.remote([{"prompt_token_ids": p} for p in PROMPTS], greedy))
            got = [list(o.outputs[0].token_ids) for o in outs]
            assert got == [w[0] for w in _hf(d, PROMPTS)], step
    finally:
        ray.shutdown()


def _async_refits(tmp_path: str, receive_while_serving: bool = False) -> dict:
    """An AsyncLLM with the xfer backend, requests in flight while refits run (with
    `receive_while_serving`: sparse deltas whose bytes arrive while the engine serves)."""
    import asyncio

    import ray
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from backends.torch.trainer import TorchTrainerGroup
    from backends.vllm.ray_engine import engine_kwargs
    from harness.hf_checkpoint import load_grouped, save_grouped
    from harness.reference import PROMPTS, set_step
    from harness.tiny_models import build, step_weights
    from harness.torch_shards import checkpoint_shards
    from refit.refitter import Refitter

    path = f"{tmp_path}/qwen3_moe"
    config = build("qwen3_moe", path)
    base = load_grouped(path)
    kwargs = engine_kwargs(path, config) | {"weight_transfer_config": {"backend": "xfer"}}
    kwargs.pop("worker_extension_cls")
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    trainer = TorchTrainerGroup.launch(2, checkpoint_shards, path, 1, 2)

    async def generate(engine, prompt, n, tag):
        sp = SamplingParams(temperature=0, max_tokens=n)
        last = None
        async for out in engine.generate({"prompt_token_ids": prompt}, sp, request_id=tag):
            last = out
        assert last is not None
        return list(last.outputs[0].token_ids)

    async def main() -> dict:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        try:
            refitter = Refitter(
                trainer, engine, strict=True, timeout_s=120, pause="wait",
                delta=receive_while_serving, receive_while_serving=receive_while_serving,
            )  # fmt: skip
            changed = 0.03 if receive_while_serving else None
            rec = {"steps": []}
            for step in (1, 2):
                old = await generate(engine, PROMPTS[0], TOKENS, f"old{step}")
                trainer.call(set_step, path, step, changed)
                in_flight = [
                    asyncio.create_task(generate(engine, PROMPTS[0], 40, f"race{step}.{i}"))
                    for i in range(2)
                ]
                await asyncio.sleep(0.05)
                stats = await asyncio.to_thread(refitter.refit)
                racing = await asyncio.gather(*in_flight)
                after = [await generate(engine, p, TOKENS, f"new{step}.{i}")
                         for i, p in enumerate(PROMPTS)]  # fmt: skip
                d = f"{tmp_path}/step{step}"
                save_grouped(step_weights(base, step, changed=changed), config, d)
                rec["steps"].append({"old": old, "racing": racing, "after": after, "dir": d,
                                     "version": stats.version, "delta": stats.delta,
                                     "pause_s": stats.pause_s, "seconds": stats.seconds,
                                     "phases": stats.phases})  # fmt: skip
            return rec
        finally:
            engine.shutdown()

    try:
        return asyncio.run(main())
    finally:
        ray.shutdown()


@pytest.mark.parametrize("receive_while_serving", [False, True])
def test_async_llm_with_requests_in_flight(tmp_path, receive_while_serving):
    from harness.reference import PROMPTS

    rec = _async_refits(str(tmp_path), receive_while_serving)
    assert len(rec["steps"]) == 2
    for s in rec["steps"]:
        want = _hf(s["dir"], PROMPTS)
        assert s["after"] == [w[0] for w in want], s
        new = want[0][0]
        for r in s["racing"]:  # finished on the old weights (wait mode) or ran on the new ones
            assert r[:TOKENS] in (s["old"], new), (r, s["old"], new)
    if receive_while_serving:
        assert [s["delta"] for s in rec["steps"]] == [False, True]
        for s in rec["steps"]:
            # the bytes arrived before the engine was paused; the pause is the install only
            assert s["phases"]["receive"] > 0 and s["pause_s"] < s["seconds"], s
