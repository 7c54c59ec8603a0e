"""The Megatron -> HF mapping on synthetic ranks: names and shapes as Megatron lays them out in
each of its three layer formats (the local spec, Transformer Engine's fused norms and grouped
experts, the legacy grouped-GEMM experts), built here from whole HF tensors by this file's own
reading of Megatron's formats, for many parallel layouts. Every rank's HF views must equal the
HF tensors' boxes bit for bit, and the boxes must be what the layouts the driver builds give.
The real-model tests (test_megatron_e2e) hold the local format against megatron-core itself.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from backends.megatron.map import Coords, MegatronParam, hf_shards, trainer_spec
from backends.parallel import Parallel
from harness.megatron_model import padded_vocab
from refit.errors import RefitError
from refit.hf import hf_params
from xfer import Segments

CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "vocab_size": 40,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 4,
    "intermediate_size": 12,
    "moe_intermediate_size": 6,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "mlp_only_layers": [0],
    "tie_word_embeddings": False,
}


def full_weights(config) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {p.name: torch.randn(p.shape, generator=g) for p in hf_params(config)}


def coords(rank, tp, pp, dp, ep, etp) -> Coords:
    local = rank % (tp * dp)
    return Coords(
        rank=rank,
        pp=rank // (tp * dp),
        tp=local % tp,
        dp=local // tp,
        cp=0,
        ep=(local // etp) % ep,
        etp=local % etp,
        edp=local // (etp * ep),
        par=Parallel(tp=tp, pp=pp, dp=dp, ep=ep, etp=etp),
    )


def part(t: torch.Tensor, dim: int, n: int, i: int) -> torch.Tensor:
    return t.chunk(n, dim)[i]


def megatron_rank(full, config, c: Coords, fmt: str, divisible_by: int):
    """(facts, tensors) of rank `c` in format `fmt`: what Megatron would hold."""
    tp, ep, etp = c.size("tp"), c.size("ep"), c.size("etp")
    pp = c.size("pp")
    facts, tensors = [], {}

    def add(name, t, *, split=False, dim=0, stride=1, layer=None, expert=False, experts=()):
        facts.append(MegatronParam(0, name, tuple(t.shape), t.dtype, split, dim, stride, layer,
                                   expert, tuple(experts)))  # fmt: skip
        tensors[(0, name)] = t.clone()

    heads, groups, d = config["num_attention_heads"], config["num_key_value_heads"], 4
    hpg = heads // groups
    n_local = config["num_experts"] // ep
    experts = range(c.ep * n_local, (c.ep + 1) * n_local)
    vocab = config["vocab_size"]
    pv = padded_vocab(vocab, tp, divisible_by)

    def vocab_shard(t):
        padded = torch.cat([t, torch.zeros(pv - vocab, t.shape[1])])
        return part(padded, 0, tp, c.tp)

    layers = [c.pp] if pp > 1 else list(range(config["num_hidden_layers"]))
    if c.pp == 0:
        add("embedding.word_embeddings.weight", vocab_shard(full["model.embed_tokens.weight"]),
            split=True)  # fmt: skip
    for i, layer in enumerate(layers):
        hf, m = f"model.layers.{layer}.", f"decoder.layers.{i}."
        a = hf + "self_attn."
        moe = layer not in config["mlp_only_layers"]
        norm = (
            "self_attention.linear_qkv.layer_norm_weight"
            if fmt != "local"
            else "input_layernorm.weight"
        )
        add(m + norm, full[hf + "input_layernorm.weight"], layer=layer)
        q, k, v = (full[a + f"{x}_proj.weight"].view(groups, -1, 16) for x in "qkv")
        qkv = torch.cat([q, k, v], 1)  # per group: q heads | k | v
        assert qkv.shape[1] == (hpg + 2) * d
        add(m + "self_attention.linear_qkv.weight", part(qkv, 0, tp, c.tp).reshape(-1, 16),
            split=True, layer=layer)  # fmt: skip
        add(m + "self_attention.linear_proj.weight", part(full[a + "o_proj.weight"], 1, tp, c.tp),
            split=True, dim=1, layer=layer)  # fmt: skip
        add(m + "self_attention.q_layernorm.weight", full[a + "q_norm.weight"], layer=layer)
        add(m + "self_attention.k_layernorm.weight", full[a + "k_norm.weight"], layer=layer)
        p = hf + "mlp."
        if not moe:
            pre = (
                "mlp.linear_fc1.layer_norm_weight" if fmt != "local" else "pre_mlp_layernorm.weight"
            )
            add(m + pre, full[hf + "post_attention_layernorm.weight"], layer=layer)
            fc1 = torch.cat([part(full[p + "gate_proj.weight"], 0, tp, c.tp),
                             part(full[p + "up_proj.weight"], 0, tp, c.tp)])  # fmt: skip
            add(m + "mlp.linear_fc1.weight", fc1, split=True, stride=2, layer=layer)
            add(m + "mlp.linear_fc2.weight", part(full[p + "down_proj.weight"], 1, tp, c.tp),
                split=True, dim=1, layer=layer)  # fmt: skip
            continue
        add(m + "pre_mlp_layernorm.weight", full[hf + "post_attention_layernorm.weight"],
            layer=layer)  # fmt: skip
        add(m + "mlp.router.weight", full[p + "gate.weight"], layer=layer, experts=experts)
        gate, up, down = (full[p + f"experts.{x}_proj.weight"] for x in ("gate", "up", "down"))
        fc1s = [torch.cat([part(gate[e], 0, etp, c.etp), part(up[e], 0, etp, c.etp)])
                for e in experts]  # fmt: skip
        fc2s = [part(down[e], 1, etp, c.etp) for e in experts]
        kw = dict(split=True, layer=layer, expert=True, experts=experts)
        if fmt == "local":
            for j, (w1, w2) in enumerate(zip(fc1s, fc2s, strict=True)):
                add(m + f"mlp.experts.local_experts.{j}.linear_fc1.weight", w1, stride=2, **kw)
                add(m + f"mlp.experts.local_experts.{j}.linear_fc2.weight", w2, dim=1, **kw)
        elif fmt == "te":
            for j, (w1, w2) in enumerate(zip(fc1s, fc2s, strict=True)):
                add(m + f"mlp.experts.linear_fc1.weight{j}", w1, stride=2, **kw)
                add(m + f"mlp.experts.linear_fc2.weight{j}", w2, dim=1, **kw)
        else:  # legacy GroupedMLP: expert j's [H, 2I'] and [I', H] are consecutive memory
            w1 = torch.stack([w.t() for w in fc1s]).reshape(16, -1)
            w2 = torch.stack([w.t() for w in fc2s]).reshape(-1, 16)
            add(m + "mlp.experts.weight1", w1, dim=1, **kw)
            add(m + "mlp.experts.weight2", w2, dim=0, **kw)
    if c.pp == pp - 1:
        add("decoder.final_layernorm.weight", full["model.norm.weight"])
        add("output_layer.weight", vocab_shard(full["lm_head.weight"]), split=True)
    return facts, tensors


LAYOUTS = [  # tp, pp, dp, ep, etp
    (1, 1, 1, 1, 1),
    (2, 1, 1, 1, 2),
    (2, 1, 1, 2, 1),
    (2, 1, 2, 2, 2),
    (1, 1, 2, 2, 1),
    (2, 2, 1, 1, 2),
    (1, 2, 2, 2, 1),
    (4, 1, 1, 2, 2),
]


@pytest.mark.parametrize("fmt", ["local", "te", "grouped"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "tp{}pp{}dp{}ep{}etp{}".format(*x))
def test_views_are_the_hf_boxes_and_the_layouts_agree(layout, fmt):
    tp, pp, dp, ep, etp = layout
    full = full_weights(CONFIG)
    parts = []
    for r in range(tp * pp * dp):
        c = coords(r, tp, pp, dp, ep, etp)
        facts, tensors = megatron_rank(full, CONFIG, c, fmt, divisible_by=2)
        shards = hf_shards(facts, CONFIG, c)
        for s in shards:
            got = s.view(tensors)
            want = full[s.name][tuple(slice(a, b) for a, b in s.box)]
            assert torch.equal(got.contiguous(), want), (r, s.name)
            assert not s.misc
            if (
                fmt == "local"
                and s.name.endswith("q_proj.weight")
                and tp < CONFIG["num_key_value_heads"]
            ):
                assert isinstance(got, Segments)  # several query groups: one view each
        parts.append((c, [s.public() for s in shards]))
    spec = trainer_spec(parts, CONFIG)
    assert {p.name for p in spec.params} == {p.name for p in hf_params(CONFIG)}
    assert len(spec.stage_ranks) == pp and not any(p.reason for p in spec.params)
    experts = next(p for p in spec.params if p.name.endswith("experts.down_proj.weight"))
    assert experts.layout.mesh.axes == ("edp", "ep", "etp")


def test_a_padded_vocab_is_misc_and_named_why():
    tp = 2
    full = full_weights(CONFIG)
    parts = []
    for r in range(tp):
        c = coords(r, tp, 1, 1, 1, tp)
        facts, tensors = megatron_rank(full, CONFIG, c, "local", divisible_by=8)  # 40 -> 48
        shards = {s.name: s for s in hf_shards(facts, CONFIG, c)}
        emb = shards["model.embed_tokens.weight"]
        assert "pads the vocab to 48 rows" in emb.misc and emb.gather is not None
        assert emb.box == (((0, 24), (0, 16)) if r == 0 else ((24, 40), (0, 16)))
        assert torch.equal(emb.view(tensors), full[emb.name][emb.box[0][0] : emb.box[0][1]])
        parts.append((c, [s.public() for s in shards.values()]))
    spec = trainer_spec(parts, CONFIG)
    misc = {p.name: p for p in spec.params if p.reason}
    assert set(misc) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert misc["lm_head.weight"].layout.mesh.flat == (0,)  # whole on the stage's first rank


def test_padding_that_still_splits_like_chunk_is_bulk():
    # 39 rows over TP 2 padded to 40: 20 + 19 rows, exactly torch.chunk's split of 39
    config = dict(CONFIG, vocab_size=39)
    full = full_weights(config)
    for r in range(2):
        c = coords(r, 2, 1, 1, 1, 2)
        facts, _ = megatron_rank(full, config, c, "local", divisible_by=4)
        emb = next(s for s in hf_shards(facts, config, c) if s.name == "model.embed_tokens.weight")
        assert not emb.misc and emb.split == ((0, "tp"),)


def _one_rank(fmt="local"):
    c = coords(0, 1, 1, 1, 1, 1)
    facts, tensors = megatron_rank(full_weights(CONFIG), CONFIG, c, fmt, divisible_by=4)
    return c, facts, tensors


def test_unknown_modules_and_bad_attributes_are_named():
    c, facts, _ = _one_rank()
    bad = [
        MegatronParam(
            0, "decoder.layers.0.self_attention.mystery.weight", (4, 4), torch.float32, layer=0
        ),
        *[
            replace(f, stride=1) if f.name == "decoder.layers.0.mlp.linear_fc1.weight" else f
            for f in facts
        ],
    ]
    with pytest.raises(RefitError) as e:
        hf_shards(bad, CONFIG, c)
    text = str(e.value)
    assert "self_attention.mystery.weight (chunk 0): no HF parameter is known" in text
    assert "linear_fc1.weight: partition_stride 1" in text


def test_expert_numbering_that_is_not_an_ep_split_is_refused():
    c = coords(1, 1, 1, 2, 2, 1)  # EP rank 1 of 2: experts 2 and 3
    facts, _ = megatron_rank(full_weights(CONFIG), CONFIG, c, "local", divisible_by=4)
    wrong = [replace(f, experts=(0, 1) if f.experts else ()) for f in facts]
    with pytest.raises(RefitError, match=r"EP rank 1 holds experts \[0, 1\].*gives 2..3"):
        hf_shards(wrong, CONFIG, c)


def test_ranks_that_disagree_or_miss_parameters_fail_the_description():
    parts = []
    full = full_weights(CONFIG)
    for r in range(2):
        c = coords(r, 2, 1, 1, 1, 2)
        facts, _ = megatron_rank(full, CONFIG, c, "local", divisible_by=4)
        shards = [s.public() for s in hf_shards(facts, CONFIG, c)]
        if r == 1:
            shards = [s for s in shards if s.name != "model.norm.weight"]
            shards = [
                replace(s, dtype=torch.bfloat16)
                if s.name == "model.layers.0.mlp.up_proj.weight"
                else s
                for s in shards
            ]
        parts.append((c, shards))
    with pytest.raises(RefitError) as e:
        trainer_spec(parts, CONFIG)
    text = str(e.value)
    assert "'model.layers.0.mlp.up_proj.weight': ranks [1] describe it unlike rank 0" in text
    assert "'model.norm.weight': layout" in text  # rank 1 of the TP mesh does not report it
