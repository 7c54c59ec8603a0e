"""Build a megatron-core GPT model equal to an HF architecture, and run its forward by hand.

For tests, demos and the benchmark's trainer side: an RL framework builds its own Megatron
models; the refit only reads them (`backends.megatron.worker`). `build(config, parallel)`
initializes Megatron's parallel state on an already initialized default process group and
returns this rank's model chunks (one per virtual pipeline stage) for `parallel` (a
`backends.parallel.Parallel`), from the HF config alone:

* Llama / Qwen3 dense: RMSNorm, SwiGLU (``linear_fc1`` = [gate; up]), no biases, GQA with
  ``num_query_groups`` KV heads; Qwen3's per-head q/k norms (``qk_layernorm``).
* Qwen3-MoE: the same attention, softmax top-k routing (``norm_topk_prob`` decides whether
  the softmax runs before or after the top-k), dense layers where HF has them.
* DeepSeek-V3: multi-latent attention (q LoRA, kv LoRA with the RoPE part, per-LoRA norms),
  sigmoid routing with the score-correction bias (Megatron's ``expert_bias``, held fixed),
  routed scaling, a shared expert, the first dense layers.

Local (non Transformer Engine) modules, float32 by default, dropout 0, fusions off, so a CPU
build is exact: its logits match HF transformers' to ~1e-6 (tests). `forward_logits` drives
the pipeline stages by hand with point-to-point sends (Megatron's schedules allocate on CUDA)
and gathers the vocab-parallel logits. On machines without CUDA, `megatron_patches.apply()`
runs first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from backends.parallel import Parallel
from refit.errors import RefitError
from refit.hf import architecture

__all__ = ["build", "forward_logits", "padded_vocab", "transformer_config"]


def padded_vocab(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's padded vocab size (a multiple of ``divisible_by * tp``)."""
    m = divisible_by * tp
    return -(-vocab // m) * m


def _rope_theta(hf: Mapping[str, Any]) -> float:
    rp = hf.get("rope_parameters") or {}
    return float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _num_experts(hf: Mapping[str, Any]) -> int:
    return int(hf.get("num_experts") or hf.get("num_local_experts") or 0)


def moe_layers(hf: Mapping[str, Any]) -> list[int] | None:
    """Per HF layer 1 for MoE, 0 for dense (HF's own rules); None for dense models."""
    arch = architecture(hf)
    n = hf["num_hidden_layers"]
    if arch == "Qwen3MoeForCausalLM":
        step = hf.get("decoder_sparse_step", 1) or 1
        dense = set(hf.get("mlp_only_layers") or [])
        e = _num_experts(hf)
        return [int(i not in dense and e > 0 and (i + 1) % step == 0) for i in range(n)]
    if arch == "DeepseekV3ForCausalLM":
        k, freq = hf.get("first_k_dense_replace", 0), hf.get("moe_layer_freq", 1) or 1
        return [int(i >= k and i % freq == 0) for i in range(n)]
    return None


def transformer_config(hf: Mapping[str, Any], par: Parallel, dtype: torch.dtype) -> Any:
    from megatron.core.transformer.transformer_config import (
        MLATransformerConfig,
        TransformerConfig,
    )

    arch = architecture(hf)
    if arch not in (
        "LlamaForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
        "DeepseekV3ForCausalLM",
    ):
        raise RefitError(f"no Megatron build for architecture {arch!r}")
    if arch != "DeepseekV3ForCausalLM" and hf.get("rope_scaling"):
        raise RefitError(f"no Megatron build for {arch} with rope_scaling {hf['rope_scaling']}")
    cfg: dict[str, Any] = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"],
        ffn_hidden_size=hf["intermediate_size"],
        normalization="RMSNorm",
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(hf.get("attention_bias", False)),
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp if par.vpp > 1 else None,
        expert_model_parallel_size=par.ep,
        expert_tensor_parallel_size=par.etp,
        sequence_parallel=False,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        init_method_std=hf.get("initializer_range", 0.02),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    pattern = moe_layers(hf)
    if pattern is not None:
        cfg.update(
            moe_layer_freq=pattern,
            moe_ffn_hidden_size=hf["moe_intermediate_size"],
            moe_router_topk=hf["num_experts_per_tok"],
            moe_grouped_gemm=False,
            moe_token_dispatcher_type="allgather",
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_permute_fusion=False,
            moe_router_fusion=False,
        )
    if arch != "DeepseekV3ForCausalLM":
        cfg.update(
            num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            kv_channels=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            qk_layernorm=arch != "LlamaForCausalLM",
        )
        if arch == "Qwen3MoeForCausalLM":
            cfg.update(
                num_moe_experts=_num_experts(hf),
                moe_router_score_function="softmax",
                # norm_topk_prob: softmax over the top-k logits; else top-k of the softmax
                moe_router_pre_softmax=not hf.get("norm_topk_prob", False),
            )
        return TransformerConfig(**cfg)
    scaling = hf.get("rope_scaling")
    n_group = hf.get("n_group") or 1
    cfg.update(
        num_query_groups=hf["num_attention_heads"],
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_head_dim=hf["qk_nope_head_dim"],
        qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        kv_channels=hf["v_head_dim"],  # the local core attention sizes its output by this
        qk_layernorm=True,  # q_a_layernorm / kv_a_layernorm
        rotary_base=_rope_theta(hf),
        num_moe_experts=hf["n_routed_experts"],
        moe_shared_expert_intermediate_size=(
            hf["moe_intermediate_size"] * (hf.get("n_shared_experts") or 0) or None
        ),
        moe_shared_expert_overlap=False,
        moe_router_score_function=hf.get("scoring_func", "sigmoid"),
        moe_router_enable_expert_bias=hf.get("topk_method", "noaux_tc") == "noaux_tc",
        moe_router_bias_update_rate=0.0,  # the refit sends it; training may update it
        moe_router_topk_scaling_factor=hf.get("routed_scaling_factor") or None,
        moe_router_num_groups=n_group if n_group > 1 else None,
        moe_router_group_topk=hf.get("topk_group") if n_group > 1 else None,
        moe_router_dtype="fp32",
    )
    if not scaling:
        # plain RoPE: mscale 1, softmax scale 1/sqrt(nope + rope) as in HF without scaling
        cfg.update(rope_type="rope", rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
    else:
        cfg.update(
            rope_type="yarn",
            rotary_scaling_factor=scaling["factor"],
            original_max_position_embeddings=scaling["original_max_position_embeddings"],
            beta_fast=scaling.get("beta_fast", 32),
            beta_slow=scaling.get("beta_slow", 1),
            mscale=scaling.get("mscale", 1.0),
            mscale_all_dim=scaling.get("mscale_all_dim", 0.0),
        )
    return MLATransformerConfig(**cfg)


def _mla_core_attention() -> type:
    """The local core attention, accepting MLA's separate q/k and v head sizes.

    MLA passes ``k_channels`` and ``v_channels``, which only Transformer Engine's attention
    takes; the local one already handles q/k and v head sizes that differ (its output is
    sized by ``kv_channels``, set to the v head size) and gets MLA's softmax scale
    explicitly, so it only has to accept and drop the two keywords.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLACoreAttention(DotProductAttention):  # type: ignore[misc]
        def __init__(self, *args: Any, k_channels: Any = None, v_channels: Any = None,
                     **kwargs: Any) -> None:  # fmt: skip
            super().__init__(*args, **kwargs)

    return MLACoreAttention


def build(
    hf: Mapping[str, Any],
    par: Parallel,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    vocab_divisible_by: int = 128,
) -> list[torch.nn.Module]:
    """Initialize Megatron's parallel state and build this rank's model chunks (eval mode).
    Megatron pads the vocab to a multiple of `vocab_divisible_by` * tp (`padded_vocab`).

    Call on every rank after ``torch.distributed.init_process_group``."""
    from harness import megatron_patches

    megatron_patches.apply()
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    if not dist.is_initialized():
        raise RefitError("megatron_model.build needs torch.distributed initialized first")
    problems = []
    if par.world != dist.get_world_size():
        problems.append(
            f"{par!r} needs {par.world} ranks, the default group has {dist.get_world_size()}"
        )
    if par.cp != 1:
        problems.append(f"cp({par.cp}): this builder has no context parallelism")
    if problems:
        raise RefitError(problems)
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp if par.vpp > 1 else None,
        expert_model_parallel_size=par.ep,
        expert_tensor_parallel_size=par.etp,
        create_gloo_process_groups=False,
    )
    torch.manual_seed(seed)  # CPU initialization draws every master weight from this RNG
    megatron_patches.seed(seed)
    config = transformer_config(hf, par, dtype)
    pp_rank = mpu.get_pipeline_model_parallel_rank()
    chunks = []
    for v in range(par.vpp):
        vp = v if par.vpp > 1 else None
        spec = get_gpt_decoder_block_spec(
            config,
            use_transformer_engine=False,
            normalization="RMSNorm",
            vp_stage=vp,
            pp_rank=pp_rank,
        )
        if config.multi_latent_attention:
            for ls in spec.layer_specs:
                ls.submodules.self_attention.submodules.core_attention = _mla_core_attention()
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab(hf["vocab_size"], par.tp, vocab_divisible_by),
            max_sequence_length=hf.get("max_position_embeddings", 4096),
            pre_process=mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            parallel_output=True,
            share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=_rope_theta(hf),  # type: ignore[arg-type]
            vp_stage=vp,
        )
        if not torch.cuda.is_available():
            model.eval()  # MoE with TP > 1 runs only in eval() on CPU; dropout is 0 anyway
        else:
            model.cuda()
        chunks.append(model)
    return chunks


def forward_logits(
    chunks: list[torch.nn.Module], tokens: torch.Tensor, vocab: int
) -> torch.Tensor | None:
    """Logits ``[batch, seq, vocab]`` of `tokens` on the last stage's ranks (None elsewhere):
    the (virtual) pipeline stages run in order, hidden states passed with send/recv, the
    vocab-parallel logits all-gathered over TP and cut to the HF vocab."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    pp, pp_rank = (
        mpu.get_pipeline_model_parallel_world_size(),
        mpu.get_pipeline_model_parallel_rank(),
    )
    device = next(chunks[0].parameters()).device
    tokens = tokens.to(device)
    b, s = tokens.shape
    pos = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), diagonal=1)[None, None]
    hidden = chunks[0].config.hidden_size
    dtype = next(chunks[0].parameters()).dtype
    out = None
    for v, chunk in enumerate(chunks):  # virtual stage v of this rank's stage
        first = v == 0 and pp_rank == 0
        last = v == len(chunks) - 1 and pp_rank == pp - 1
        if not first:
            h = torch.empty(s, b, hidden, dtype=dtype, device=device)
            dist.recv(h, src=mpu.get_pipeline_model_parallel_prev_rank())
            chunk.set_input_tensor(h)  # type: ignore[operator]
        with torch.no_grad():
            y = chunk(input_ids=tokens if first else None, position_ids=pos, attention_mask=mask)
        if last:
            out = y
        else:
            dist.send(y.contiguous(), dst=mpu.get_pipeline_model_parallel_next_rank())
    if out is None:
        return None
    tp = mpu.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=mpu.get_tensor_model_parallel_group())
        out = torch.cat(parts, -1)
    return out[..., :vocab].float().cpu()
