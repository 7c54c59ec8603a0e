"""vLLM's sharding rules, as pure functions of the HF config and the engine's parallelism.

For every HF parameter (`refit.hf.hf_params`) this says where vLLM 0.32 keeps it in
checkpoint format: the vLLM parameter (`target`), the offset of the HF tensor's region inside
a rank's local copy of that parameter (`offset`; the region's size is the layout's local
shape), and the `Layout` of the HF tensor over the replica's ranks, or ``None`` (misc) with a
reason when vLLM's split cannot be expressed exactly. No vLLM import: the benchmark plans
full-size models with it, and the live worker (`backends.vllm.worker`) checks every rule
against the real parameter shapes before trusting it.

Rules (TP = tensor parallel size of one engine; ranks 0..TP-1):

* q/k/v -> ``qkv_proj`` rows ``[q_r; k_r; v_r]``; q split by heads; k/v by KV heads, and when
  there are fewer KV heads than TP each is replicated on ``TP / kv_heads`` consecutive ranks
  (a 2-axis mesh ``(kv, rep)`` with ``[Shard(0), Replicate()]``).
* gate/up -> ``gate_up_proj`` rows ``[gate_r; up_r]``; o/down are split on dim 1.
* embedding / lm_head: vocab padded to a multiple of 64, split in ``padded / TP`` rows; exact
  only when that equals ``ceil(V / TP)`` (always at TP 1), misc otherwise. Tied heads alias
  the embedding.
* routed experts -> ``mlp.experts.routed_experts.w13_weight`` ``[E_r, 2 I_r, H]`` (gate rows
  then up rows) and ``w2_weight`` ``[E_r, H, I_r]``: without expert parallelism I is split
  over TP; with it (EP = TP) experts are split in contiguous blocks, the first ``E % EP``
  ranks one larger (misc when that differs from ``torch.chunk``), I whole.
* MLA: ``fused_qkv_a_proj`` = rows ``[q_a; kv_a_with_mqa]`` replicated (when q_lora_rank is
  set); q_b / q / kv_b split by heads; shared experts are a dense ``gate_up_proj`` +
  ``down_proj``.
* norms, routers, ``e_score_correction_bias``: replicated.
* blockwise FP8: weights are bytes in the same places; their ``weight_scale_inv`` go misc
  (vLLM's loader splits the scale blocks next to the bulk weight, in the same module).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from refit.hf import HFParam, Role, hf_dtype, hf_params
from refit.spec import DestParam, EngineSpec
from xfer import Layout, Mesh, Replicate, Shard
from xfer.layout import Placement

__all__ = ["VllmDest", "engine_spec", "mtp_prefixes", "vllm_dests"]

VOCAB_PADDING = 64


@dataclass(frozen=True)
class VllmDest:
    hf: HFParam
    target: str
    offset: tuple[int, ...]
    layout: Layout | None
    reason: str = ""


def _replace_suffix(name: str, old: str, new: str) -> str:
    assert name.endswith(old), (name, old)
    return name[: -len(old)] + new


def vllm_dests(
    config: Mapping[str, Any], tp: int, *, expert_parallel: bool = False
) -> list[VllmDest]:
    """Where each HF parameter lands in one vLLM engine of tensor-parallel size `tp`."""
    c = config
    tp_mesh = Mesh(list(range(tp)), ("tp",))
    h = c["hidden_size"]
    nh = c["num_attention_heads"]
    nkv = c.get("num_key_value_heads") or nh
    d = c.get("head_dim") or (h // nh if nh else 0)
    out: list[VllmDest] = []

    def lay(placements: list[Placement], shape: tuple[int, ...], mesh: Mesh = tp_mesh) -> Layout:
        return Layout(mesh, placements, shape)

    def rep(
        p: HFParam, target: str | None = None, offset: tuple[int, ...] | None = None
    ) -> VllmDest:
        return VllmDest(
            p, target or p.name, offset or (0,) * len(p.shape), lay([Replicate()], p.shape)
        )

    def misc(p: HFParam, target: str, why: str) -> VllmDest:
        return VllmDest(p, target, (0,) * len(p.shape), None, why)

    def split(p: HFParam, dim: int, target: str, offset: tuple[int, ...] | None = None) -> VllmDest:
        n = p.shape[dim]
        if n % tp:
            return misc(p, target, f"dim {dim} of size {n} does not split evenly over TP {tp}")
        return VllmDest(p, target, offset or (0,) * len(p.shape), lay([Shard(dim)], p.shape))

    def vocab(p: HFParam, target: str) -> VllmDest:
        v = p.shape[0]
        padded = -(-v // VOCAB_PADDING) * VOCAB_PADDING
        if padded % tp:
            return misc(p, target, f"padded vocab {padded} does not split over TP {tp}")
        if tp > 1 and padded // tp != -(-v // tp):
            return misc(
                p,
                target,
                f"vLLM splits the padded vocab in blocks of {padded // tp}, not ceil({v}/{tp})",
            )
        return VllmDest(p, target, (0, 0), lay([Shard(0)], p.shape))

    targets: dict[str, str] = {}  # weight name -> its vLLM target, for FP8 scales
    for p in hf_params(c):
        n, r = p.name, p.role
        if r == Role.SCALE_INV:
            weight_target = targets[n[: -len("_scale_inv")]]
            out.append(misc(p, weight_target + "_scale_inv", "FP8 scales load through vLLM"))
            continue
        if r == Role.EMBED or r == Role.LM_HEAD:
            out.append(vocab(p, n))
        elif r in (Role.NORM, Role.ROUTER, Role.ROUTER_BIAS):
            out.append(rep(p))
        elif r in (Role.Q, Role.K, Role.V, Role.Q_BIAS, Role.K_BIAS, Role.V_BIAS):
            suffix = ".weight" if r in (Role.Q, Role.K, Role.V) else ".bias"
            proj = {"q": "q_proj", "k": "k_proj", "v": "v_proj"}[r.value[0]]
            target = _replace_suffix(n, f"{proj}{suffix}", f"qkv_proj{suffix}")
            out.append(_qkv(p, target, r.value[0], tp, nh, nkv, d, lay))
        elif r == Role.OUT:
            out.append(split(p, 1, n))
        elif r in (Role.GATE, Role.UP):
            proj = "gate_proj" if r == Role.GATE else "up_proj"
            target = _replace_suffix(n, f"{proj}.weight", "gate_up_proj.weight")
            inter = p.shape[0]
            offset = (0, 0) if r == Role.GATE else (inter // tp, 0)
            out.append(split(p, 0, target, offset))
        elif r == Role.DOWN:
            out.append(split(p, 1, n))
        elif r in (Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN):
            out.append(_expert(p, tp, expert_parallel, lay))
        elif r == Role.MLA_Q_A:
            target = _replace_suffix(n, "q_a_proj.weight", "fused_qkv_a_proj.weight")
            out.append(rep(p, target, (0, 0)))
        elif r == Role.MLA_KV_A:
            if c.get("q_lora_rank"):
                target = _replace_suffix(n, "kv_a_proj_with_mqa.weight", "fused_qkv_a_proj.weight")
                out.append(rep(p, target, (c["q_lora_rank"], 0)))
            else:
                out.append(rep(p))
        elif r in (Role.MLA_Q_B, Role.MLA_Q, Role.MLA_KV_B):
            if nh % tp:
                out.append(misc(p, n, f"{nh} heads do not split over TP {tp}"))
            else:
                out.append(split(p, 0, n))
        else:  # pragma: no cover - every Role is handled above
            raise AssertionError(r)
        targets[n] = out[-1].target
    # tied: lm_head aliases model.embed_tokens.weight; the HF inventory lists only the embedding
    return out


def engine_spec(
    config: Mapping[str, Any],
    tp: int,
    *,
    expert_parallel: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> EngineSpec:
    """What a vLLM replica of tensor-parallel size `tp` would describe, from metadata only."""
    params = tuple(
        DestParam(
            d.hf.name, d.hf.shape, hf_dtype(d.hf, config, dtype), d.target, d.layout, d.reason
        )
        for d in vllm_dests(config, tp, expert_parallel=expert_parallel)
    )
    return EngineSpec(world=tp, params=params, ignored=mtp_prefixes(config))


def mtp_prefixes(config: Mapping[str, Any]) -> tuple[str, ...]:
    """Name prefixes of multi-token-prediction layers: in the checkpoint, not in the engine."""
    nl = config["num_hidden_layers"]
    return tuple(
        f"model.layers.{nl + i}." for i in range(config.get("num_nextn_predict_layers") or 0)
    )


def _qkv(
    p: HFParam, target: str, which: str, tp: int, nh: int, nkv: int, d: int, lay: Any
) -> VllmDest:
    zeros = (0,) * len(p.shape)
    if nh % tp:
        return VllmDest(p, target, zeros, None, f"{nh} query heads do not split over TP {tp}")
    q_local = nh // tp * d
    if tp >= nkv:
        if tp % nkv:
            return VllmDest(p, target, zeros, None, f"TP {tp} is not a multiple of {nkv} KV heads")
        kv_local = d
        kv_mesh = Mesh(np.arange(tp).reshape(nkv, tp // nkv), ("tp_kv", "tp_rep"))
        kv_place: list[Placement] = [Shard(0), Replicate()]
    else:
        if nkv % tp:
            return VllmDest(p, target, zeros, None, f"{nkv} KV heads do not split over TP {tp}")
        kv_local = nkv // tp * d
        kv_mesh = Mesh(list(range(tp)), ("tp",))
        kv_place = [Shard(0)]
    start = {"q": 0, "k": q_local, "v": q_local + kv_local}[which]
    offset = (start, *zeros[1:])
    if which == "q":
        return VllmDest(p, target, offset, lay([Shard(0)], p.shape))
    return VllmDest(p, target, offset, lay(kv_place, p.shape, kv_mesh))


def _expert(p: HFParam, tp: int, expert_parallel: bool, lay: Any) -> VllmDest:
    base = p.name.rsplit(".experts.", 1)[0] + ".experts.routed_experts."
    e, a, b = p.shape  # gate/up: [E, I, H]; down: [E, H, I]
    is_down = p.role == Role.EXPERT_DOWN
    target = base + ("w2_weight" if is_down else "w13_weight")
    if expert_parallel and tp > 1:
        blocks = [e // tp + (1 if i < e % tp else 0) for i in range(tp)]
        chunk = -(-e // tp)
        torch_blocks = [max(0, min(chunk, e - i * chunk)) for i in range(tp)]
        if blocks != torch_blocks:
            return VllmDest(
                p,
                target,
                (0, 0, 0),
                None,
                f"vLLM places {e} experts on EP {tp} as {blocks}, not torch.chunk's {torch_blocks}",
            )
        inter = b if is_down else a
        offset = (0, 0, 0) if is_down or p.role == Role.EXPERT_GATE else (0, inter, 0)
        return VllmDest(p, target, offset, lay([Shard(0)], p.shape))
    inter = b if is_down else a
    if inter % tp:
        return VllmDest(
            p, target, (0, 0, 0), None, f"expert intermediate {inter} does not split over TP {tp}"
        )
    if is_down:
        return VllmDest(p, target, (0, 0, 0), lay([Shard(2)], p.shape))
    offset = (0, 0, 0) if p.role == Role.EXPERT_GATE else (0, inter // tp, 0)
    return VllmDest(p, target, offset, lay([Shard(1)], p.shape))
