"""The HuggingFace parameter inventory of a model, from its config alone (no weights).

`hf_params(config)` lists every parameter a HuggingFace checkpoint of the architecture holds:
name, global shape, and a `Role` that says what the tensor does (a query projection, an
expert's up projection, an MLA down-projection ...). Both sides' sharding rules are written
against roles, never by matching substrings of names. Per-expert parameters are listed
grouped: one ``[E, ...]`` tensor per projection and layer, named with the expert index
replaced by nothing (``model.layers.3.mlp.experts.gate_proj.weight``); `expert_name` and
`split_expert_name` convert between the grouped name and the per-expert HF names.

Architectures: Llama / Mistral / Qwen2 / Qwen3 dense, Qwen3-MoE, Qwen2-MoE (shared expert and
its gate), Mixtral (``block_sparse_moe``, experts ``w1``/``w3``/``w2``), GLM-4.5
(``Glm4MoeForCausalLM``: DeepSeek-style MoE with score-correction bias and shared experts,
attention with bias and optional q/k norms), DeepSeek-V2/V3 (MLA, shared experts, dense
first layers). gpt-oss is refused with the reason (vLLM 0.32 cannot reload its experts). Anything else raises `UnsupportedModel` naming the architecture.

transformers 5 modules hold the experts of a layer fused: ``experts.gate_up_proj``
``[E, 2I, H]`` (gate rows, then up rows, per expert) and ``experts.down_proj`` ``[E, H, I]``.
`fused_parts` names the grouped HF parameters such a tensor holds and where (index slices),
so a trainer can present them as views of the fused tensor, without a copy.

Blockwise FP8 checkpoints (``quantization_config`` with ``quant_method: fp8`` and a
``weight_block_size``, as DeepSeek-V3 ships) store every decoder linear weight as
``float8_e4m3fn`` with a float32 ``<name>_scale_inv`` of one value per block; `hf_dtype`
gives each parameter's checkpoint dtype.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

__all__ = [
    "fused_parts",
    "HFParam",
    "Role",
    "UnsupportedModel",
    "architecture",
    "expert_name",
    "fp8_block",
    "hf_dtype",
    "hf_params",
    "split_expert_name",
    "ungroup",
]


class UnsupportedModel(ValueError):
    pass


class Role(StrEnum):
    EMBED = "embed"
    LM_HEAD = "lm_head"
    NORM = "norm"  # any RMSNorm / LayerNorm weight
    Q = "q"
    K = "k"
    V = "v"
    Q_BIAS = "q_bias"
    K_BIAS = "k_bias"
    V_BIAS = "v_bias"
    OUT = "o"  # attention output projection
    GATE = "gate"  # dense or shared-expert MLP
    UP = "up"
    DOWN = "down"
    ROUTER = "router"
    ROUTER_BIAS = "router_bias"
    EXPERT_GATE = "expert_gate"  # grouped [E, I, H]
    EXPERT_UP = "expert_up"
    EXPERT_DOWN = "expert_down"  # grouped [E, H, I]
    MLA_Q_A = "mla_q_a"  # [q_lora_rank, H]
    MLA_Q_B = "mla_q_b"  # [heads * qk_head_dim, q_lora_rank]
    MLA_Q = "mla_q"  # [heads * qk_head_dim, H] when q_lora_rank is None
    MLA_KV_A = "mla_kv_a"  # [kv_lora_rank + rope_dim, H]
    MLA_KV_B = "mla_kv_b"  # [heads * (nope + v), kv_lora_rank]
    SCALE_INV = "scale_inv"  # blockwise FP8 inverse scales of the weight named without suffix


@dataclass(frozen=True)
class HFParam:
    name: str
    shape: tuple[int, ...]
    role: Role
    layer: int | None = None  # decoder layer, None for embeddings / final norm / head
    shared: bool = False  # a shared expert's dense MLP (DeepSeek)


# per-expert names: <layer>.experts.<e>.<proj>.weight; Mixtral's projections are w1/w3/w2
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.((?:\w+_proj|w[123])\.weight(?:_scale_inv)?)$")


def expert_name(group: str, expert: int) -> str:
    """Per-expert HF name of expert `expert` in grouped parameter `group`."""
    head, _, tail = group.rpartition(".experts.")
    return f"{head}.experts.{expert}.{tail}"


def split_expert_name(name: str) -> tuple[str, int] | None:
    """(grouped name, expert index) for a per-expert HF name, else None."""
    m = _EXPERT.match(name)
    if m is None:
        return None
    return f"{m.group(1)}.{m.group(3)}", int(m.group(2))


_FUSED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")


def fused_parts(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[slice, ...]]] | None:
    """For a transformers-5 fused expert tensor (``<layer>.experts.gate_up_proj`` ``[E, 2I,
    H]`` or ``<layer>.experts.down_proj`` ``[E, H, I]``), the grouped HF parameters it holds
    and the index of each in it; None for any other name."""
    m = _FUSED.match(name)
    if m is None or len(shape) != 3:
        return None
    head, kind = m.groups()
    if kind == "down_proj":
        return [(f"{head}.down_proj.weight", (slice(None),) * 3)]
    if shape[1] % 2:
        return None
    i = shape[1] // 2
    return [
        (f"{head}.gate_proj.weight", (slice(None), slice(0, i), slice(None))),
        (f"{head}.up_proj.weight", (slice(None), slice(i, 2 * i), slice(None))),
    ]


_GROUPED = re.compile(r"^.*\.experts\.(?:\w+_proj|w[123])\.weight(?:_scale_inv)?$")


def ungroup(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A grouped expert tensor ``[E, ...]`` as its per-expert HF tensors; others as they are."""
    if _GROUPED.match(name) and t.dim() == 3:
        return [(expert_name(name, e), t[e]) for e in range(t.shape[0])]
    return [(name, t)]


_QUANTIZED = {
    Role.Q, Role.K, Role.V, Role.OUT, Role.GATE, Role.UP, Role.DOWN,
    Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN,
    Role.MLA_Q_A, Role.MLA_Q_B, Role.MLA_Q, Role.MLA_KV_A, Role.MLA_KV_B,
}  # fmt: skip


def fp8_block(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """The FP8 weight block size of a blockwise-FP8 checkpoint, else None."""
    q = config.get("quantization_config") or {}
    if q.get("quant_method") == "fp8" and q.get("weight_block_size"):
        b0, b1 = q["weight_block_size"]
        return int(b0), int(b1)
    return None


def hf_dtype(p: HFParam, config: Mapping[str, Any], default: torch.dtype) -> torch.dtype:
    """Checkpoint dtype of `p` in a checkpoint whose unquantized tensors are `default`."""
    if p.role in (Role.SCALE_INV, Role.ROUTER_BIAS):
        return torch.float32
    if p.role in _QUANTIZED and fp8_block(config) is not None:
        return torch.float8_e4m3fn
    return default


def _with_scales(ps: list[HFParam], block: tuple[int, int] | None) -> list[HFParam]:
    if block is None:
        return ps
    out = []
    for p in ps:
        out.append(p)
        if p.role in _QUANTIZED:
            *lead, rows, cols = p.shape
            shape = (*lead, -(-rows // block[0]), -(-cols // block[1]))
            out.append(HFParam(p.name + "_scale_inv", shape, Role.SCALE_INV, p.layer, p.shared))
    return out


def architecture(config: Mapping[str, Any]) -> str:
    archs = config.get("architectures") or []
    if not archs:
        raise UnsupportedModel("config has no 'architectures' entry")
    return str(archs[0])


def _attention_llama(c: Mapping[str, Any], p: str, qk_norm: bool, bias: bool) -> list[HFParam]:
    h, nh = c["hidden_size"], c["num_attention_heads"]
    nkv = c.get("num_key_value_heads") or nh
    d = c.get("head_dim") or h // nh
    out = [
        HFParam(f"{p}.self_attn.q_proj.weight", (nh * d, h), Role.Q),
        HFParam(f"{p}.self_attn.k_proj.weight", (nkv * d, h), Role.K),
        HFParam(f"{p}.self_attn.v_proj.weight", (nkv * d, h), Role.V),
        HFParam(f"{p}.self_attn.o_proj.weight", (h, nh * d), Role.OUT),
    ]
    if bias:
        out += [
            HFParam(f"{p}.self_attn.q_proj.bias", (nh * d,), Role.Q_BIAS),
            HFParam(f"{p}.self_attn.k_proj.bias", (nkv * d,), Role.K_BIAS),
            HFParam(f"{p}.self_attn.v_proj.bias", (nkv * d,), Role.V_BIAS),
        ]
    if qk_norm:
        out += [
            HFParam(f"{p}.self_attn.q_norm.weight", (d,), Role.NORM),
            HFParam(f"{p}.self_attn.k_norm.weight", (d,), Role.NORM),
        ]
    return out


def _attention_mla(c: Mapping[str, Any], p: str) -> list[HFParam]:
    h, nh = c["hidden_size"], c["num_attention_heads"]
    nope, rope, vd = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    qlr, kvlr = c.get("q_lora_rank"), c["kv_lora_rank"]
    out = []
    if qlr:
        out += [
            HFParam(f"{p}.self_attn.q_a_proj.weight", (qlr, h), Role.MLA_Q_A),
            HFParam(f"{p}.self_attn.q_a_layernorm.weight", (qlr,), Role.NORM),
            HFParam(f"{p}.self_attn.q_b_proj.weight", (nh * (nope + rope), qlr), Role.MLA_Q_B),
        ]
    else:
        out.append(HFParam(f"{p}.self_attn.q_proj.weight", (nh * (nope + rope), h), Role.MLA_Q))
    out += [
        HFParam(f"{p}.self_attn.kv_a_proj_with_mqa.weight", (kvlr + rope, h), Role.MLA_KV_A),
        HFParam(f"{p}.self_attn.kv_a_layernorm.weight", (kvlr,), Role.NORM),
        HFParam(f"{p}.self_attn.kv_b_proj.weight", (nh * (nope + vd), kvlr), Role.MLA_KV_B),
        HFParam(f"{p}.self_attn.o_proj.weight", (h, nh * vd), Role.OUT),
    ]
    return out


def _dense_mlp(p: str, h: int, inter: int, shared: bool = False) -> list[HFParam]:
    return [
        HFParam(f"{p}.gate_proj.weight", (inter, h), Role.GATE, shared=shared),
        HFParam(f"{p}.up_proj.weight", (inter, h), Role.UP, shared=shared),
        HFParam(f"{p}.down_proj.weight", (h, inter), Role.DOWN, shared=shared),
    ]


def _experts(
    p: str, h: int, inter: int, e: int, names: tuple[str, str, str] | None = None
) -> list[HFParam]:
    gate, up, down = names or ("gate_proj", "up_proj", "down_proj")
    return [
        HFParam(f"{p}.experts.{gate}.weight", (e, inter, h), Role.EXPERT_GATE),
        HFParam(f"{p}.experts.{up}.weight", (e, inter, h), Role.EXPERT_UP),
        HFParam(f"{p}.experts.{down}.weight", (e, h, inter), Role.EXPERT_DOWN),
    ]


def _deepseek_moe(c: Mapping[str, Any], p: str, h: int, e: int) -> list[HFParam]:
    """DeepSeek-style routed experts with a score-correction bias and shared experts."""
    ps = [HFParam(f"{p}.mlp.gate.weight", (e, h), Role.ROUTER)]
    if c.get("topk_method", "noaux_tc") == "noaux_tc":
        ps.append(HFParam(f"{p}.mlp.gate.e_score_correction_bias", (e,), Role.ROUTER_BIAS))
    inter = c["moe_intermediate_size"]
    ps += _experts(f"{p}.mlp", h, inter, e)
    ns = c.get("n_shared_experts") or 0
    if ns:
        ps += _dense_mlp(f"{p}.mlp.shared_experts", h, inter * ns, shared=True)
    return ps


def hf_params(config: Mapping[str, Any]) -> list[HFParam]:
    """Every parameter of the architecture's HF checkpoint, experts grouped, in layer order.

    Multi-token-prediction layers (DeepSeek ``num_nextn_predict_layers``) are not part of the
    main model and are not listed.
    """
    arch = architecture(config)
    c = config
    h, nl, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    out = [HFParam("model.embed_tokens.weight", (vocab, h), Role.EMBED)]
    for layer in range(nl):
        p = f"model.layers.{layer}"
        ps = [
            HFParam(f"{p}.input_layernorm.weight", (h,), Role.NORM),
            HFParam(f"{p}.post_attention_layernorm.weight", (h,), Role.NORM),
        ]
        if arch in (
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
        ):
            bias = arch == "Qwen2ForCausalLM" or bool(c.get("attention_bias"))
            ps += _attention_llama(c, p, qk_norm=arch == "Qwen3ForCausalLM", bias=bias)
            ps += _dense_mlp(f"{p}.mlp", h, c["intermediate_size"])
        elif arch == "Qwen3MoeForCausalLM":
            ps += _attention_llama(c, p, qk_norm=True, bias=bool(c.get("attention_bias")))
            step = c.get("decoder_sparse_step", 1) or 1
            e = c.get("num_experts") or c.get("num_local_experts") or 0
            sparse = (
                layer not in (c.get("mlp_only_layers") or []) and e > 0 and (layer + 1) % step == 0
            )
            if sparse:
                ps.append(HFParam(f"{p}.mlp.gate.weight", (e, h), Role.ROUTER))
                ps += _experts(f"{p}.mlp", h, c["moe_intermediate_size"], e)
            else:
                ps += _dense_mlp(f"{p}.mlp", h, c["intermediate_size"])
        elif arch in ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM"):
            ps += _attention_mla(c, p)
            e = c.get("n_routed_experts")
            sparse = (
                e is not None
                and layer >= c.get("first_k_dense_replace", 0)
                and layer % (c.get("moe_layer_freq", 1) or 1) == 0
            )
            if sparse:
                assert e is not None
                ps += _deepseek_moe({"topk_method": None} | dict(c), p, h, e)
            else:
                ps += _dense_mlp(f"{p}.mlp", h, c["intermediate_size"])
        elif arch == "MixtralForCausalLM":
            ps += _attention_llama(c, p, qk_norm=False, bias=False)
            e = c["num_local_experts"]
            moe = f"{p}.block_sparse_moe"
            ps.append(HFParam(f"{moe}.gate.weight", (e, h), Role.ROUTER))
            ps += _experts(moe, h, c["intermediate_size"], e, ("w1", "w3", "w2"))
        elif arch == "Qwen2MoeForCausalLM":
            ps += _attention_llama(c, p, qk_norm=False, bias=True)
            step = c.get("decoder_sparse_step", 1) or 1
            e = c["num_experts"]
            if layer not in (c.get("mlp_only_layers") or []) and (layer + 1) % step == 0:
                ps.append(HFParam(f"{p}.mlp.gate.weight", (e, h), Role.ROUTER))
                ps += _experts(f"{p}.mlp", h, c["moe_intermediate_size"], e)
                si = c["shared_expert_intermediate_size"]
                ps += _dense_mlp(f"{p}.mlp.shared_expert", h, si, shared=True)
                ps.append(HFParam(f"{p}.mlp.shared_expert_gate.weight", (1, h), Role.ROUTER))
            else:
                ps += _dense_mlp(f"{p}.mlp", h, c["intermediate_size"])
        elif arch == "GptOssForCausalLM":
            raise UnsupportedModel(
                "gpt-oss cannot be refit with vLLM 0.32: its loader writes the experts with "
                "param.copy_ instead of their weight loaders, so vLLM's layerwise reload (which "
                "refit and vLLM's own reload_weights use) cannot update them, and a refit would "
                "leave them stale; the rest of the model would be bulk"
            )
        elif arch == "Glm4MoeForCausalLM":
            qk_norm = bool(c.get("use_qk_norm"))
            ps += _attention_llama(c, p, qk_norm=qk_norm, bias=bool(c.get("attention_bias")))
            if layer >= c.get("first_k_dense_replace", 0):
                ps += _deepseek_moe(c, p, h, c["n_routed_experts"])
            else:
                ps += _dense_mlp(f"{p}.mlp", h, c["intermediate_size"])
        else:
            raise UnsupportedModel(
                f"architecture {arch!r} is not supported (supported: Llama, Mistral, Qwen2, "
                "Qwen3, Qwen3-MoE, Qwen2-MoE, Mixtral, GLM-4.5 (Glm4MoeForCausalLM), "
                "DeepSeek-V2/V3): refit needs its parameter inventory in refit.hf and vLLM's "
                "placement of each in backends.vllm.layout"
            )
        ps = _with_scales(ps, fp8_block(c))
        out += [HFParam(x.name, x.shape, x.role, layer, x.shared) for x in ps]
    out.append(HFParam("model.norm.weight", (h,), Role.NORM))
    if not c.get("tie_word_embeddings", False):
        out.append(HFParam("lm_head.weight", (vocab, h), Role.LM_HEAD))
    return out
