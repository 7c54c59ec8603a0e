"""Refit planner tests on full-size configs from metadata only (no weights, no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from backends.parallel import Parallel
from backends.torch.trainer import metadata_spec
from backends.vllm.layout import engine_spec, vllm_dests
from refit.errors import RefitError
from refit.hf import Role, hf_dtype, hf_params
from refit.planner import plan_refit
from refit.spec import DestParam, EngineSpec, Kind, SourceParam, TrainerSpec
from xfer import Layout, Mesh, Replicate, Shard
from xfer.wire import WireError

CONFIGS = Path(__file__).resolve().parent.parent / "benches" / "configs"


def model(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]


# trainer parallel sizes -> engine (tp, expert parallel, replicas)
CASES = {
    "llama3_8b": (Parallel(pp=2, dp=2, tp=4), dict(tp=8), 2),
    "qwen3_30b_a3b": (Parallel(pp=2, dp=8, ep=8), dict(tp=4, expert_parallel=True), 2),
    "qwen3_235b_a22b": (Parallel(pp=4, dp=16, ep=16), dict(tp=8), 2),
    "dsv3": (Parallel(pp=16, dp=16, ep=16), dict(tp=32), 8),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_full_size_models_are_all_bulk(name):
    cfg = model(name)
    par, engine_args, replicas = CASES[name]
    trainer = metadata_spec(cfg, par)
    plan = plan_refit(trainer, [engine_spec(cfg, **engine_args)] * replicas)
    assert plan.bulk_fraction >= 0.995, plan.summary()
    # attention, embeddings, the head and shared experts ride bulk too, not only the FFN
    kinds = {c.name: c.kind for c in plan.report}
    assert kinds["model.embed_tokens.weight"] == Kind.BULK
    assert kinds["lm_head.weight"] == Kind.BULK
    assert kinds["model.layers.1.self_attn.o_proj.weight"] == Kind.BULK
    total = sum(
        torch.Size(p.shape).numel() * hf_dtype(p, cfg, torch.bfloat16).itemsize
        for p in hf_params(cfg)
    )
    assert plan.bulk_bytes + plan.misc_bytes == total
    assert plan.stages == par.pp
    assert plan.bulk == sum(1 for c in plan.report if c.kind == Kind.BULK)
    assert len(plan.items) == len(plan.report)


def test_dsv3_parameter_count_and_vllm_bytes_per_gpu():
    cfg = model("dsv3")
    n = sum(torch.Size(p.shape).numel() for p in hf_params(cfg))
    assert round(n / 1e9, 1) == 671.0
    # what one engine rank of a TP32 replica holds, from the layouts alone (bf16): ~42 GB,
    # the figure the design's lower bound uses (~43.9 GB with vLLM's replicated norms)
    spec = engine_spec(cfg, 32)
    per_rank = sum(torch.Size(p.layout.local_shape(0)).numel() * 2 for p in spec.params if p.layout)
    assert 41e9 < per_rank < 45e9


def test_fp8_weights_bulk_scales_misc():
    cfg = model("dsv3") | {
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}
    }
    trainer = metadata_spec(cfg, Parallel(pp=16, dp=16, ep=16))
    plan = plan_refit(trainer, [engine_spec(cfg, 32)])
    by = {c.name: c for c in plan.report}
    w = by["model.layers.5.mlp.experts.gate_proj.weight"]
    s = by["model.layers.5.mlp.experts.gate_proj.weight_scale_inv"]
    assert w.kind == Kind.BULK and s.kind == Kind.MISC
    assert s.target == "model.layers.5.mlp.experts.routed_experts.w13_weight_scale_inv"
    src = {p.name: p for p in trainer.params}
    assert src[w.name].dtype == torch.float8_e4m3fn and src[s.name].dtype == torch.float32
    assert plan.bulk_fraction >= 0.995


def test_precision_mismatch_is_refused():
    cfg = model("llama3_8b")
    fp8 = cfg | {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    with pytest.raises(RefitError) as e:
        plan_refit(metadata_spec(cfg, Parallel(tp=2)), [engine_spec(fp8, 2)])
    text = str(e.value)
    assert (
        "precision mismatch: trainer sends torch.bfloat16, engine holds torch.float8_e4m3fn" in text
    )
    assert "weight_scale_inv" in text  # the engine expects scales the trainer does not send


def test_gqa_with_fewer_kv_heads_than_tp_is_exact():
    cfg = model("llama3_8b")  # 8 KV heads
    dests = {d.hf.name: d for d in vllm_dests(cfg, 16)}
    k = dests["model.layers.0.self_attn.k_proj.weight"]
    assert k.layout is not None
    for rank in range(16):
        head = rank // 2  # vLLM: rank r holds KV head r // (tp / kv_heads)
        assert k.layout.bounds(rank)[0] == (head * 128, (head + 1) * 128)
        assert k.offset == (32 // 16 * 128, 0)  # after this rank's 2 query heads


def test_vocab_padding_that_is_not_chunk_shaped_goes_misc():
    cfg = model("llama3_8b") | {"vocab_size": 1000}
    by = {d.hf.name: d for d in vllm_dests(cfg, 4)}
    assert by["model.embed_tokens.weight"].layout is None
    assert "blocks of 256, not ceil(1000/4)" in by["model.embed_tokens.weight"].reason
    assert {d.hf.name: d for d in vllm_dests(cfg, 1)}[
        "model.embed_tokens.weight"
    ].layout is not None


@pytest.mark.parametrize(("experts", "ep", "bulk"), [(8, 3, True), (10, 4, False), (128, 8, True)])
def test_expert_parallel_placement_exactness(experts, ep, bulk):
    cfg = model("qwen3_30b_a3b") | {"num_experts": experts, "num_hidden_layers": 1}
    d = next(x for x in vllm_dests(cfg, ep, expert_parallel=True) if x.hf.role == Role.EXPERT_UP)
    assert (d.layout is not None) == bulk, d.reason


def _tiny_sides():
    mesh = Mesh([0, 1], ("tp",))
    src = [
        SourceParam("a", (4, 4), torch.float32, 0, Layout(mesh, [Shard(0)], (4, 4))),
        SourceParam("b", (4,), torch.float32, 0, Layout(mesh, [Replicate()], (4,))),
        SourceParam("c", (6, 2), torch.float32, 0, Layout(mesh, [Shard(0)], (6, 2))),
    ]
    one = Mesh([0], ("tp",))
    dst = [
        DestParam("a", (4, 4), torch.float32, "x.a", Layout(one, [Replicate()], (4, 4))),
        DestParam("b", (4,), torch.float32, "x.b", None, "test"),
        DestParam("c", (6, 2), torch.float32, "x.c", None, "test"),
    ]
    return TrainerSpec(2, ((0, 1),), tuple(src)), EngineSpec(1, tuple(dst))


def test_misc_goes_from_the_trainers_shards_to_a_whole_copy_on_every_engine_rank():
    trainer, engine = _tiny_sides()
    plan = plan_refit(trainer, [engine, engine])
    assert plan.world == 4 and plan.bulk == 1
    a = plan.items[0]
    assert a.name == "a" and a.dst.mesh.flat == (2, 3)  # one rank per replica, replicated
    misc = {m.name: m for m in plan.misc}
    assert list(misc) == ["b", "c"] and [m.item for m in plan.misc] == [1, 2]
    for name, m in misc.items():
        it = plan.items[m.item]
        assert it.name == name and it.src == trainer.params[m.item].layout
        assert it.dst.mesh.flat == (2, 3)  # every engine rank of every replica ...
        for r in (2, 3):  # ... holds the whole tensor
            assert it.dst.local_shape(r) == it.src.shape


def test_a_trainer_that_cannot_give_a_layout_sends_misc_even_where_the_engine_has_one():
    trainer, engine = _tiny_sides()
    whole = Layout(Mesh([0], ("owner",)), [Replicate()], (4, 4))
    flagged = SourceParam("a", (4, 4), torch.float32, 0, whole, "vocab padded")
    trainer = TrainerSpec(2, ((0, 1),), (flagged, *trainer.params[1:]))
    plan = plan_refit(trainer, [engine])
    a = next(c for c in plan.report if c.name == "a")
    assert a.kind == Kind.MISC and a.reason == "trainer: vocab padded"
    assert plan.bulk == 0
    item = plan.items[next(m.item for m in plan.misc if m.name == "a")]
    assert item.src == whole and item.dst.local_shape(2) == (4, 4)


def test_specs_and_setups_round_trip_through_json():
    from refit.setup import RankOptions, RankSetup

    trainer, engine = _tiny_sides()
    setup = RankSetup("127.0.0.1", 1234, "p", "ab" * 16, 2, trainer, engine, 2, RankOptions())
    back = RankSetup.from_json(setup.to_json())
    assert back == setup
    for parts in (0, 4096):  # the plan option travels with the rank's options
        opts = RankOptions(part_bytes=parts, relay=2)
        assert RankOptions.from_json(opts.to_json()) == opts
    with pytest.raises(WireError, match="part_bytes: -1 < 0"):
        RankOptions.from_json(RankOptions(part_bytes=-1).to_json())
    assert back.plan().items == plan_refit(trainer, [engine, engine]).items
    cfg = model("dsv3") | {"num_hidden_layers": 4}
    spec = metadata_spec(cfg, Parallel(pp=2, dp=4, ep=4))
    assert TrainerSpec.from_json(spec.to_json()) == spec
    eng = engine_spec(cfg, 4)
    assert EngineSpec.from_json(eng.to_json()) == eng


def test_inconsistent_sides_raise_one_error_listing_everything():
    trainer, engine = _tiny_sides()
    bad_dst = (
        DestParam("a", (4, 5), torch.float32, "x.a", None),
        DestParam("b", (4,), torch.bfloat16, "x.b", None),
        DestParam("z", (2,), torch.float32, "x.z", None),
    )
    other = EngineSpec(1, engine.params[:2])
    with pytest.raises(RefitError) as e:
        plan_refit(trainer, [EngineSpec(1, bad_dst), other])
    v = "\n".join(e.value.violations)
    assert "engine replicas 0 and 1 hold different parameters" in v
    assert "'a': trainer shape [4, 4] != engine shape [4, 5]" in v
    assert "'b': precision mismatch" in v
    assert "'z' (engine x.z, [2] torch.float32) is missing on the trainer" in v
    assert "the trainer sends 1 parameters the engine does not hold: ['c']" in v
