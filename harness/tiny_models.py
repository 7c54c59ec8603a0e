"""Tiny real models built locally from transformers configs (no hub), for tests and demos.

`build(kind, path)` writes a float32 checkpoint and config for one of ``KINDS`` and returns
the config dict. Sizes are small but keep every structural feature: GQA (Qwen3 has one KV head, so engine
TP 2 replicates it), q/k norms, MoE with
a dense first layer, MLA with q-LoRA and shared experts (DeepSeek-V3 on CPU needs the 576-wide
latent, hence ``kv_lora_rank=512, qk_rope_head_dim=64``). `step_weights` derives the weights
of training step ``n`` deterministically, so a trainer and a reference model agree on them.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch

from harness.hf_checkpoint import load_grouped, save_grouped

__all__ = ["KINDS", "build", "build_from_config", "step_weights"]

# transformers model types of the architectures refit knows
_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Glm4MoeForCausalLM": "glm4_moe",
    "GptOssForCausalLM": "gpt_oss",
}

KINDS = (
    "qwen3", "qwen3_tied", "qwen3_moe", "dsv3", "mixtral", "qwen2_moe", "glm4_moe", "gpt_oss"
)  # fmt: skip

_COMMON = dict(vocab_size=256, hidden_size=128, max_position_embeddings=256, num_hidden_layers=2)


def _config(kind: str, overrides: dict[str, Any]) -> Any:
    from transformers import DeepseekV3Config, Qwen3Config, Qwen3MoeConfig

    if kind in ("qwen3", "qwen3_tied"):
        cls: Any = Qwen3Config
        fields: dict[str, Any] = dict(
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            tie_word_embeddings=kind == "qwen3_tied",
        )
    elif kind == "qwen3_moe":
        cls = Qwen3MoeConfig
        fields = dict(
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            mlp_only_layers=[0],
            norm_topk_prob=True,
        )
    elif kind == "dsv3":
        cls = DeepseekV3Config
        fields = dict(
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=32,
            kv_lora_rank=512,
            qk_nope_head_dim=32,
            qk_rope_head_dim=64,
            v_head_dim=32,
            n_group=1,
            topk_group=1,
            rope_scaling=None,
        )
    elif kind == "mixtral":
        from transformers import MixtralConfig

        cls = MixtralConfig
        fields = dict(
            intermediate_size=64,
            num_local_experts=4,
            num_experts_per_tok=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
        )
    elif kind == "qwen2_moe":
        from transformers import Qwen2MoeConfig

        cls = Qwen2MoeConfig
        fields = dict(
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            mlp_only_layers=[0],
            norm_topk_prob=False,
        )
    elif kind == "glm4_moe":
        from transformers import Glm4MoeConfig

        cls = Glm4MoeConfig
        fields = dict(
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            n_group=1,
            topk_group=1,
            use_qk_norm=True,
            attention_bias=True,
            partial_rotary_factor=0.5,
            num_nextn_predict_layers=0,
        )
    elif kind == "gpt_oss":
        from transformers import GptOssConfig

        cls = GptOssConfig
        fields = dict(
            intermediate_size=64,
            num_local_experts=4,
            num_experts_per_tok=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            sliding_window=64,
        )
    else:
        raise ValueError(f"unknown tiny model {kind!r}; choose from {KINDS}")
    return cls(**{**_COMMON, **fields, **overrides})


def build(
    kind: str, path: str | Path, *, seed: int = 0, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write a random float32 checkpoint of `kind` to `path` (once); return its config.
    `overrides` change config fields (e.g. ``num_hidden_layers``)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if cfg_file.exists():
        return json.loads(cfg_file.read_text())
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(kind, overrides or {}), dtype=torch.float32)
    model.save_pretrained(path)
    config = json.loads(cfg_file.read_text())
    if kind == "dsv3":
        # what vLLM's DeepSeek-V3 expects and the CPU MLA backend supports
        config.update(topk_method="noaux_tc", scoring_func="sigmoid")
        with torch.no_grad():  # a non-zero routing bias, so it matters
            tensors = load_grouped(path)
            for name, t in tensors.items():
                if name.endswith("e_score_correction_bias"):
                    t.copy_(torch.linspace(-0.1, 0.1, t.numel()))
            save_grouped(tensors, config, path)
    cfg_file.write_text(json.dumps(config, indent=1))
    return config


def build_from_config(config: dict[str, Any], path: str | Path, *, seed: int = 0) -> dict[str, Any]:
    """Write a random float32 checkpoint for an HF config dict (e.g. a benchmark's scaled-down
    architecture) to `path` (once); return the config as saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    cfg_file = path / "config.json"
    if cfg_file.exists():
        return json.loads(cfg_file.read_text())
    arch = config["architectures"][0]
    if arch not in _MODEL_TYPES:
        raise ValueError(f"no transformers model type known for {arch}")
    fields = {k: v for k, v in config.items() if k not in ("architectures", "quantization_config")}
    hf = AutoConfig.for_model(_MODEL_TYPES[arch], **fields)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(hf, dtype=torch.float32).save_pretrained(path)
    saved = json.loads(cfg_file.read_text())
    for k in ("topk_method", "scoring_func", "n_group", "topk_group"):  # vLLM reads these
        if k in config:
            saved[k] = config[k]
    if arch == "DeepseekV3ForCausalLM":
        saved.setdefault("topk_method", "noaux_tc")
        saved.setdefault("scoring_func", "sigmoid")
    cfg_file.write_text(json.dumps(saved, indent=1))
    return saved


def step_weights(
    base: dict[str, torch.Tensor], step: int, *, scale: float = 0.02, changed: float | None = None
) -> dict[str, torch.Tensor]:
    """The full weights after training step `step`: base + a deterministic per-name delta.

    With `changed`, each step instead gives new values to that fraction of the previous
    step's elements (chosen at random, deterministically), as sparse updates do."""
    if changed is not None:
        out = dict(base)
        for k in range(1, step + 1):
            for name, t in out.items():
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 1000 + k)
                mask = torch.rand(t.shape, generator=g) < changed
                new = t.float() + torch.randn(t.shape, generator=g) * scale * (
                    1 + t.float().abs().mean()
                )
                out[name] = torch.where(mask, new.to(t.dtype), t)
        return out
    out = {}
    for name, t in base.items():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 1000 + step)
        delta = torch.randn(t.shape, generator=g, dtype=torch.float32) * scale
        out[name] = (t.float() + delta * (1 + t.float().abs().mean())).to(t.dtype)
    return out
