"""A refit across the nodes of a real multi-node Ray cluster (`ray.cluster_utils.Cluster`,
three nodes on this machine): trainer ranks on one node, the vLLM engine on another, the
driver on the head. The refit's store and the gloo groups bind this machine's routable
address (not loopback), and the engine then generates exactly what HF transformers does."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _node(_obj=None) -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def test_refit_across_ray_nodes(tmp_path: Path):
    import ray
    from ray.cluster_utils import Cluster

    from backends.torch.trainer import TorchTrainerGroup
    from backends.vllm.ray_engine import RayEngine, VllmEngineActor, engine_kwargs
    from harness.hf_checkpoint import load_grouped, save_grouped
    from harness.reference import PROMPTS, hf_generate, set_step
    from harness.tiny_models import build, step_weights
    from harness.torch_shards import checkpoint_shards
    from refit.refitter import Refitter
    from tests.support import listeners as _listeners
    from xfer.net import routable_address

    path = str(tmp_path / "qwen3_moe")
    config = build("qwen3_moe", path)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=2, resources={"trainer_node": 4})
    cluster.add_node(num_cpus=2, resources={"engine_node": 4})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        trainer = TorchTrainerGroup.launch(
            2, checkpoint_shards, path, 1, 2, resources={"trainer_node": 1}
        )
        actor = ray.remote(num_cpus=0.5, resources={"engine_node": 1})(VllmEngineActor)
        engine = actor.remote(engine_kwargs(path, config))
        trainer_nodes = set(trainer.call(_node))
        engine_node = ray.get(engine.call.remote(_node))
        assert len(trainer_nodes) == 1 and engine_node not in trainer_nodes
        assert _node() not in trainer_nodes | {engine_node}  # the driver on the head
        host = routable_address()
        assert host != "127.0.0.1", "this machine has no routable address to test with"
        refitter = Refitter(trainer, RayEngine(engine), host=host, strict=True)
        base = load_grouped(path)
        for step in (1, 2):
            trainer.call(set_step, path, step)
            stats = refitter.refit()
            assert stats.bulk_bytes > 0
            d = str(tmp_path / f"step{step}")
            save_grouped(step_weights(base, step), config, d)
            got = ray.get(engine.generate.remote(PROMPTS, 6))
            want = hf_generate(d, PROMPTS, 6)
            assert [g[0] for g in got] == [w[0] for w in want], step
        ip = "".join(f"{int(x):02X}" for x in reversed(host.split(".")))  # /proc/net/tcp form
        assert _listeners(refitter._store.port) == {ip}  # the store: this address only
    finally:
        ray.shutdown()
        cluster.shutdown()
