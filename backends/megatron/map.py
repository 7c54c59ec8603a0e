"""Megatron-core parameters as HF-named shards: names, boxes, layouts and local views.

A Megatron rank holds model chunks (one per virtual pipeline stage) whose parameters are
named by Megatron (``decoder.layers.3.self_attention.linear_qkv.weight``), numbered locally
(layers restart per chunk, experts per EP rank) and split by its parallel groups. The refit
speaks HF names and global shapes. This module is the translation, as pure functions of
facts a rank reads from its live model (`MegatronParam`, `Coords`), so it can be tested with
synthetic names and shapes as well as with real models.

What decides what. The HF name comes from the module a parameter belongs to (the only thing a
name can tell). How it is split comes from Megatron's own attributes and groups: a parameter
with ``tensor_model_parallel`` is split on ``partition_dim`` over the tensor-parallel group, or
over the expert-tensor-parallel group for a routed expert's weight; ``partition_stride`` says
how many HF tensors are interleaved in each shard (2 for a gated MLP's ``linear_fc1``: each
shard is ``[gate shard; up shard]``); routed experts are split over the EP group (global
expert id = EP rank * local count + local index, checked against the layer's own
``local_expert_indices``); the layer's ``layer_number`` (global, 1-based) gives the HF layer.

The formats, per module (local transformer spec; Transformer Engine and grouped-GEMM names
map to the same HF tensors):

=====================================================  =========================================
Megatron                                               HF
=====================================================  =========================================
embedding.word_embeddings / output_layer               embed_tokens / lm_head (vocab rows, padded)
input_layernorm, linear_qkv.layer_norm_weight (TE)     input_layernorm
pre_mlp_layernorm, linear_fc1.layer_norm_weight (TE)   post_attention_layernorm
linear_qkv (per query group: q heads | k | v)          q_proj, k_proj, v_proj (weight, bias)
linear_proj (row parallel)                             o_proj
q_layernorm, k_layernorm                               q_norm, k_norm (MLA: q_a_layernorm)
linear_q_down_proj, linear_q_up_proj, linear_q_proj    q_a_proj, q_b_proj, q_proj
linear_kv_down_proj, linear_kv_up_proj, kv_layernorm   kv_a_proj_with_mqa, kv_b_proj, kv_a_layernorm
mlp.linear_fc1 ([gate; up] per shard), linear_fc2      gate_proj, up_proj, down_proj
mlp.router.weight, router.expert_bias (a buffer)       mlp.gate.weight, e_score_correction_bias
experts.local_experts.{j}.linear_fc1/2,                experts.{gate,up,down}_proj, grouped [E, ...]
experts.linear_fc1/2.weight{j} (TE grouped),
experts.weight1 [H, n*2I] / weight2 [n*I, H] (legacy)
shared_experts.linear_fc1/2                            shared_experts.{gate,up,down}_proj
decoder.final_layernorm                                model.norm
=====================================================  =========================================

Local views, never copies: a shard of a fused or per-expert tensor is a view of the Megatron
tensor, or an `xfer.Segments` of views (a rank's q rows are one stretch per query group; its
part of a grouped expert tensor is one parameter per local expert). The exception is a vocab
padded beyond the HF vocab (Megatron pads to a multiple of ``make_vocab_size_divisible_by *
TP``): each TP shard then holds a fixed number of rows, which is not how ``torch.chunk``
splits the HF vocab, so it cannot be a `Layout`. Such a parameter is sent as misc: the TP
group of the stage's first rank all-gathers it to that rank (`HFShard.gather`), which sends
it whole. Never an approximation. Tied embeddings: the last stage's ``output_layer`` copy is
not sent (HF has no ``lm_head`` then).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from backends.parallel import DENSE_AXES, EXPERT_AXES, Parallel
from refit.errors import RefitError
from refit.hf import architecture, hf_params
from refit.spec import SourceParam, TrainerSpec
from xfer import Layout, Mesh, Replicate, Segments, Shard
from xfer.layout import Placement
from xfer.segments import Local

__all__ = [
    "AXES",
    "Coords",
    "HFShard",
    "MegatronParam",
    "StageMeshes",
    "hf_shards",
    "shard_layout",
    "stage_meshes",
    "trainer_spec",
]

AXES = DENSE_AXES + EXPERT_AXES  # the axes of a stage's two meshes (`backends.parallel`)

Tensors = Mapping[tuple[int, str], torch.Tensor]  # (chunk, Megatron name) -> local tensor
View = Callable[[Tensors], Local]


@dataclass(frozen=True)
class Coords:
    """A rank's place in Megatron's parallel groups (read from `parallel_state`): its index
    in each group, and the groups' sizes (`par`)."""

    rank: int
    pp: int
    tp: int
    dp: int
    cp: int
    ep: int
    etp: int
    edp: int
    par: Parallel

    def size(self, axis: str) -> int:
        return self.par.size(axis)

    def index(self, axis: str) -> int:
        return int(getattr(self, axis))


@dataclass(frozen=True)
class MegatronParam:
    """Facts about one parameter (or the router's expert-bias buffer) of a model chunk."""

    chunk: int  # virtual pipeline stage (0 without virtual pipelining)
    name: str  # Megatron's name inside the chunk
    shape: tuple[int, ...]
    dtype: torch.dtype
    tp_split: bool = False  # tensor_model_parallel
    dim: int = 0  # partition_dim
    stride: int = 1  # partition_stride
    layer: int | None = None  # HF layer (layer_number - 1) for decoder layers
    expert: bool = False  # a routed expert's weight (EP / expert-TP groups)
    experts: tuple[int, ...] = ()  # global ids of the layer's local experts, in local order

    @property
    def key(self) -> tuple[int, str]:
        return (self.chunk, self.name)


@dataclass(frozen=True)
class HFShard:
    """What a rank holds of one HF parameter."""

    name: str
    shape: tuple[int, ...]  # global HF shape
    dtype: torch.dtype
    box: tuple[tuple[int, int], ...]  # [start, stop) per dim: the HF region this rank holds
    split: tuple[tuple[int, str], ...] = ()  # (tensor dim, mesh axis) of its layout
    expert_mesh: bool = False  # layout over (edp, ep, etp) instead of (dp, tp)
    misc: str = ""  # why it has no layout (then: gathered whole to the stage's first rank)
    # for misc: all-gather this Megatron tensor over (axis) on (dim), cut to the HF extent
    gather: tuple[str, int, tuple[int, str]] | None = None
    mirror: bool = False  # a copy another stage sends (tied output layer): loaded, not sent
    view: View | None = field(default=None, compare=False, repr=False)

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.box)

    def public(self) -> HFShard:
        """The picklable description (without the view)."""
        return HFShard(
            self.name, self.shape, self.dtype, self.box, self.split, self.expert_mesh,
            self.misc, self.gather, self.mirror,
        )  # fmt: skip


def shard_layout(s: HFShard, dense: Mesh, experts: Mesh) -> Layout:
    """The `Layout` of a bulk shard over its stage's meshes."""
    mesh = experts if s.expert_mesh else dense
    place: list[Placement] = [Replicate()] * mesh.ndim
    for dim, axis in s.split:
        place[mesh.axis_index(axis)] = Shard(dim)
    return Layout(mesh, place, s.shape)


def _chunk(n: int, parts: int, i: int) -> tuple[int, int]:
    """``torch.chunk`` bounds of piece `i` of `n` rows in `parts` pieces."""
    lay = Layout(Mesh(list(range(parts)), ("x",)), [Shard(0)], (n,))
    b = lay.bounds(i)
    assert b is not None
    return b[0]


class _Mapper:
    def __init__(
        self, config: Mapping[str, Any], coords: Coords, tied: bool, problems: list[str]
    ) -> None:
        self.c = config
        self.coords = coords
        self.tied = tied
        self.problems = problems
        self.arch = architecture(config)
        self.mla = self.arch in ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")
        self.hf = {p.name: p.shape for p in hf_params(config)}
        self.out: list[HFShard] = []
        # grouped expert tensors: HF name -> {local expert index: (view, dtype, inner box)}
        self.expert_parts: dict[str, dict[int, tuple[View, torch.dtype, tuple]]] = {}
        self.expert_ids: dict[str, tuple[int, ...]] = {}

    # -- helpers -------------------------------------------------------------------------
    def _shape(self, name: str) -> tuple[int, ...] | None:
        shape = self.hf.get(name)
        if shape is None:
            self.problems.append(f"maps to {name!r}, which the HF model does not have")
        return shape

    def _split(self, p: MegatronParam) -> tuple[str, int, int] | None:
        """(axis, size, index) that splits `p`, or None if it is replicated."""
        if not p.tp_split:
            return None
        axis = "etp" if p.expert else "tp"
        return axis, self.coords.size(axis), self.coords.index(axis)

    def _box(
        self, p: MegatronParam, name: str, shape: tuple[int, ...], dim: int, rows: int
    ) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, str], ...]] | None:
        """The rank's box of HF `shape` split on `dim` per `p`'s attributes, checking that the
        local extent there is `rows`."""
        box = [(0, n) for n in shape]
        split: tuple[tuple[int, str], ...] = ()
        s = self._split(p)
        if s is not None:
            axis, size, idx = s
            box[dim] = _chunk(shape[dim], size, idx)
            split = ((dim, axis),)
        if box[dim][1] - box[dim][0] != rows:
            self.problems.append(
                f"{p.name} (chunk {p.chunk}, local {list(p.shape)}): expected {rows} local rows "
                f"on dim {dim} of {name!r} {list(shape)}, its layout gives {box[dim]}"
            )
            return None
        return tuple(box), split

    def emit(self, p: MegatronParam, name: str, view: View, dim: int = 0) -> None:
        """`p` (or the part `view` selects) is this rank's shard of HF `name`."""
        shape = self._shape(name)
        if shape is None:
            return
        local = self._local_shape(p, view, shape)
        if local is None:
            return
        got = self._box(p, name, shape, dim, local[dim])
        if got is None:
            return
        box, split = got
        for d, (a, b) in enumerate(box):
            if d != dim and b - a != local[d]:
                self.problems.append(
                    f"{p.name}: local {list(local)} does not fit {name!r} {list(shape)}"
                )
                return
        self.out.append(HFShard(name, shape, p.dtype, box, split, view=view))

    def _local_shape(
        self, p: MegatronParam, view: View, shape: tuple[int, ...]
    ) -> tuple[int, ...] | None:
        fake = {p.key: torch.empty(p.shape, dtype=p.dtype, device="meta")}
        try:
            return tuple(view(fake).shape)
        except (RuntimeError, IndexError, ValueError) as e:
            self.problems.append(f"{p.name}: local {list(p.shape)} cannot be viewed as {e}")
            return None

    def fused(self, p: MegatronParam, parts: Sequence[tuple[str, int]], blocks: int) -> None:
        """`p` holds `blocks` blocks along dim 0, each the concatenation of ``rows`` rows of
        every HF tensor in `parts` ((name, rows per block))."""
        width = sum(r for _, r in parts)
        if p.shape[0] != blocks * width:
            what = ", ".join(f"{n.rsplit('.', 2)[-2]} {r}" for n, r in parts)
            self.problems.append(
                f"{p.name}: {p.shape[0]} rows are not {blocks} blocks of {width} ({what})"
            )
            return
        off = 0
        for name, rows in parts:
            self.emit(p, name, _rows_view(p.key, blocks, width, off, rows))
            off += rows

    def expert(self, p: MegatronParam, name: str, j: int, view: View, dim: int) -> None:
        """`view` is local expert `j`'s shard of grouped HF `name` without its expert dim."""
        self.expert_parts.setdefault(name, {})[j] = (view, p.dtype, (p, dim))
        self.expert_ids[name] = p.experts

    def finish_experts(self) -> None:
        ep, ep_size = self.coords.ep, self.coords.size("ep")
        for name, parts in self.expert_parts.items():
            shape = self._shape(name)
            if shape is None:
                continue
            n = len(parts)
            ids = self.expert_ids[name]
            lo, hi = _chunk(shape[0], ep_size, ep)
            if sorted(parts) != list(range(n)) or tuple(ids) != tuple(range(lo, hi)):
                self.problems.append(
                    f"{name!r}: EP rank {ep} holds experts {list(ids)} as local {sorted(parts)}; "
                    f"an EP split of {shape[0]} experts over {ep_size} ranks gives {lo}..{hi - 1}"
                )
                continue
            views = [parts[j][0] for j in range(n)]
            p, dim = parts[0][2]
            first = self._local_shape(p, views[0], shape[1:])
            if first is None:
                continue
            got = self._box(p, name, shape, dim + 1, first[dim])
            if got is None:
                continue
            box, split = got
            box = ((lo, hi), *box[1:])
            if tuple(b - a for a, b in box[1:]) != first:
                self.problems.append(
                    f"{p.name}: an expert's local {list(first)} does not fit {name!r} {list(shape)}"
                )
                continue
            self.out.append(
                HFShard(
                    name,
                    shape,
                    parts[0][1],
                    box,
                    ((0, "ep"), *split),
                    expert_mesh=True,
                    view=_experts_view(views),
                )
            )

    # -- rules -----------------------------------------------------------------------------
    def param(self, p: MegatronParam) -> None:
        n = p.name
        if n == "embedding.word_embeddings.weight":
            self.vocab(p, "model.embed_tokens.weight")
        elif n == "output_layer.weight":
            # tied: the last stage's copy of the embedding (pipeline parallel only)
            self.vocab(p, "model.embed_tokens.weight" if self.tied else "lm_head.weight",
                       mirror=self.tied)  # fmt: skip
        elif n == "decoder.final_layernorm.weight":
            self.emit(p, "model.norm.weight", _whole(p.key))
        elif n.startswith("decoder.layers.") and p.layer is not None:
            self.layer(p, n.split(".", 3)[3], f"model.layers.{p.layer}.")
        else:
            self.problems.append(f"{n} (chunk {p.chunk}): no HF parameter is known for it")

    def vocab(self, p: MegatronParam, name: str, mirror: bool = False) -> None:
        shape = self._shape(name)
        if shape is None:
            return
        vocab, rows = shape[0], p.shape[0]
        tp, idx = self.coords.size("tp"), self.coords.tp
        if not p.tp_split:
            tp, idx = 1, 0
        start = min(idx * rows, vocab)
        stop = min(start + rows, vocab)
        box = ((start, stop), (0, shape[1]))
        view = _narrow(p.key, 0, 0, stop - start)
        fits = all(_chunk(vocab, tp, i) == (min(i * rows, vocab), min((i + 1) * rows, vocab))
                   for i in range(tp))  # fmt: skip
        if fits:
            split = ((0, "tp"),) if p.tp_split else ()
            self.out.append(HFShard(name, shape, p.dtype, box, split, mirror=mirror, view=view))
            return
        why = (
            f"Megatron pads the vocab to {rows * tp} rows ({rows} per TP shard), which does not "
            f"split {vocab} rows the way torch.chunk does"
        )
        gather = ("tp", 0, p.key)
        self.out.append(
            HFShard(name, shape, p.dtype, box, misc=why, gather=gather, mirror=mirror, view=view)
        )

    def layer(self, p: MegatronParam, s: str, hf: str) -> None:
        attn, mlp = hf + "self_attn.", hf + "mlp."
        if s in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
            self.emit(p, hf + "input_layernorm.weight", _whole(p.key))
        elif s in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
            self.emit(p, hf + "post_attention_layernorm.weight", _whole(p.key))
        elif s in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            self.qkv(p, attn, s.rsplit(".", 1)[1])
        elif s == "self_attention.linear_proj.weight":
            self.emit(p, attn + "o_proj.weight", _whole(p.key), dim=p.dim)
        elif s == "self_attention.q_layernorm.weight":
            self.emit(p, attn + ("q_a_layernorm.weight" if self.mla else "q_norm.weight"),
                      _whole(p.key))  # fmt: skip
        elif s == "self_attention.k_layernorm.weight":
            self.emit(p, attn + "k_norm.weight", _whole(p.key))
        elif s in ("self_attention.kv_layernorm.weight",
                   "self_attention.linear_kv_up_proj.layer_norm_weight"):  # fmt: skip
            self.emit(p, attn + "kv_a_layernorm.weight", _whole(p.key))
        elif s == "self_attention.linear_q_up_proj.layer_norm_weight":
            self.emit(p, attn + "q_a_layernorm.weight", _whole(p.key))
        elif s.startswith("self_attention.linear_") and s.endswith(".weight") and self.mla:
            hf_mla = {
                "linear_q_down_proj": "q_a_proj",
                "linear_q_up_proj": "q_b_proj",
                "linear_q_proj": "q_proj",
                "linear_kv_down_proj": "kv_a_proj_with_mqa",
                "linear_kv_up_proj": "kv_b_proj",
            }.get(s.split(".")[1])
            if hf_mla is None:
                self.problems.append(f"{p.name}: no HF parameter is known for it")
            else:
                self.emit(p, f"{attn}{hf_mla}.weight", _whole(p.key), dim=p.dim)
        elif s in ("mlp.linear_fc1.weight", "mlp.shared_experts.linear_fc1.weight"):
            prefix = mlp + ("shared_experts." if "shared" in s else "")
            self.gate_up(p, prefix + "gate_proj.weight", prefix + "up_proj.weight")
        elif s in ("mlp.linear_fc2.weight", "mlp.shared_experts.linear_fc2.weight"):
            prefix = mlp + ("shared_experts." if "shared" in s else "")
            self.emit(p, prefix + "down_proj.weight", _whole(p.key), dim=p.dim)
        elif s == "mlp.router.weight":
            self.emit(p, mlp + "gate.weight", _whole(p.key))
        elif s == "mlp.router.expert_bias":
            self.emit(p, mlp + "gate.e_score_correction_bias", _whole(p.key))
        elif s.startswith("mlp.experts."):
            self.experts(p, s[len("mlp.experts.") :], mlp + "experts.")
        else:
            self.problems.append(f"{p.name} (chunk {p.chunk}): no HF parameter is known for it")

    def qkv(self, p: MegatronParam, attn: str, kind: str) -> None:
        c = self.c
        heads, groups = c["num_attention_heads"], c.get("num_key_value_heads") or 0
        d = c.get("head_dim") or c["hidden_size"] // heads
        groups = groups or heads
        tp = self.coords.size("tp") if p.tp_split else 1
        if groups % tp or heads % groups:
            self.problems.append(
                f"{p.name}: {groups} query groups / {heads} heads cannot be split over TP {tp}"
            )
            return
        per = heads // groups * d
        self.fused(
            p,
            [(f"{attn}{x}_proj.{kind}", r) for x, r in (("q", per), ("k", d), ("v", d))],
            groups // tp,
        )

    def _fc1_half(self, p: MegatronParam) -> int | None:
        """Rows of gate (and of up) in a gated MLP's fc1 shard `p`, if it is [gate; up]."""
        if p.tp_split and p.stride != 2:
            self.problems.append(
                f"{p.name}: partition_stride {p.stride}; a gated MLP's fc1 shard is "
                "[gate; up] (stride 2), anything else is not known"
            )
            return None
        return p.shape[0] // 2

    def gate_up(self, p: MegatronParam, gate: str, up: str) -> None:
        half = self._fc1_half(p)
        if half is not None:
            self.fused(p, [(gate, half), (up, half)], 1)

    _TE_GROUPED = re.compile(r"^linear_fc([12])\.weight(\d+)$")
    _LOCAL = re.compile(r"^local_experts\.(\d+)\.linear_fc([12])\.weight$")

    def experts(self, p: MegatronParam, s: str, prefix: str) -> None:
        names = {k: f"{prefix}{k}_proj.weight" for k in ("gate", "up", "down")}
        hit = self._LOCAL.match(s)
        m = self._TE_GROUPED.match(s)
        if hit or m:
            j, fc = (int(hit.group(1)), hit.group(2)) if hit else (int(m.group(2)), m.group(1))  # type: ignore[union-attr]
            if fc == "1":
                half = self._fc1_half(p)
                if half is None:
                    return
                self.expert(p, names["gate"], j, _narrow(p.key, 0, 0, half), 0)
                self.expert(p, names["up"], j, _narrow(p.key, 0, half, half), 0)
            else:
                self.expert(p, names["down"], j, _whole(p.key), p.dim)
        elif s in ("weight1", "weight2"):
            # legacy GroupedMLP: weight1 [H, n * 2I'] viewed per expert as [H, 2I'] (gate
            # columns first), weight2 [n * I', H] as [I', H]; HF rows are their columns
            n = len(p.experts)
            h = self.c["hidden_size"]
            if s == "weight1":
                cols = p.shape[1] // n
                for j in range(n):
                    for k, lo in (("gate", 0), ("up", cols // 2)):
                        self.expert(p, names[k], j, _grouped_view(p.key, n, h, j, lo, cols // 2), 0)
            else:
                for j in range(n):
                    self.expert(p, names["down"], j, _grouped_view(p.key, n, h, j, None, 0), 1)
        else:
            self.problems.append(f"{p.name} (chunk {p.chunk}): no HF parameter is known for it")


# -- views (closures over the tensors' keys; evaluated on real or meta tensors) -------------
def _whole(key: tuple[int, str]) -> View:
    return lambda t: t[key]


def _narrow(key: tuple[int, str], dim: int, start: int, length: int) -> View:
    return lambda t: t[key].narrow(dim, start, length)


def _rows_view(key: tuple[int, str], blocks: int, width: int, off: int, rows: int) -> View:
    def view(t: Tensors) -> Local:
        x = t[key]
        if blocks == 1:
            return x[off : off + rows]
        return Segments([x[b * width + off : b * width + off + rows] for b in range(blocks)])

    return view


def _experts_view(views: Sequence[View]) -> View:
    def view(t: Tensors) -> Local:
        parts = [v(t) for v in views]
        if len(parts) == 1:
            x = parts[0]
            assert isinstance(x, torch.Tensor)
            return x.unsqueeze(0)
        return Segments([x.unsqueeze(0) for x in parts])  # type: ignore[union-attr]

    return view


def _grouped_view(
    key: tuple[int, str], n: int, hidden: int, j: int, col: int | None, width: int
) -> View:
    def view(t: Tensors) -> Local:
        x = t[key]
        if col is None:  # weight2 [n * I', H]: expert j is [I', H]; HF down is its transpose
            return x.view(n, -1, hidden)[j].t()
        return x.view(n, hidden, -1)[j][:, col : col + width].t()

    return view


def hf_shards(
    params: Sequence[MegatronParam], config: Mapping[str, Any], coords: Coords
) -> list[HFShard]:
    """Every HF shard a rank holding `params` has. Raises one `RefitError` listing every
    parameter it cannot map (unknown module, shape that does not fit the HF tensor, expert
    numbering that is not an EP split)."""
    problems: list[str] = []
    tied = bool(config.get("tie_word_embeddings", False))
    m = _Mapper(config, coords, tied, problems)
    for p in params:
        m.param(p)
    m.finish_experts()
    seen: dict[str, HFShard] = {}
    for s in m.out:
        if s.mirror:
            continue
        if s.name in seen:
            problems.append(f"{s.name!r} is mapped twice on rank {coords.rank}")
        seen[s.name] = s
    if problems:
        raise RefitError([f"rank {coords.rank}: {x}" for x in problems])
    return m.out


@dataclass(frozen=True)
class StageMeshes:
    dense: Mesh  # (dp, tp)
    experts: Mesh  # (edp, ep, etp)

    @property
    def ranks(self) -> tuple[int, ...]:
        """The stage's ranks, dense mesh order: its first is (dp 0, tp 0), the stage owner."""
        return tuple(int(r) for r in self.dense.flat)


def stage_meshes(coords: Sequence[Coords]) -> list[StageMeshes]:
    """Each pipeline stage's dense and expert meshes, from every rank's coordinates."""
    import numpy as np

    problems: list[str] = []
    par = coords[0].par
    for c in coords:
        if c.par != par:
            problems.append(f"rank {c.rank} has group sizes {c.par!r}, rank 0 {par!r}")
    if par.cp != 1:
        problems.append(f"context parallel size {par.cp} is not supported")
    if problems:
        raise RefitError(problems)
    out = []
    for s in range(par.pp):
        members = [c for c in coords if c.pp == s]
        dense = np.full((par.dp, par.tp), -1, dtype=np.int64)
        experts = np.full((par.edp, par.ep, par.etp), -1, dtype=np.int64)
        for c in members:
            for arr, at in ((dense, (c.dp, c.tp)), (experts, (c.edp, c.ep, c.etp))):
                if arr[at] != -1:
                    problems.append(f"stage {s}: ranks {arr[at]} and {c.rank} both claim {at}")
                arr[at] = c.rank
        for arr, what in ((dense, "(dp, tp)"), (experts, "(edp, ep, etp)")):
            if (arr == -1).any():
                problems.append(f"stage {s}: no rank at {what} {np.argwhere(arr == -1)[0]}")
        if not problems:
            out.append(StageMeshes(Mesh(dense, DENSE_AXES), Mesh(experts, EXPERT_AXES)))
    if problems:
        raise RefitError(problems)
    return out


def trainer_spec(
    parts: Sequence[tuple[Coords, Sequence[HFShard]]],
    config: Mapping[str, Any],
    *,
    device: str = "cpu",
) -> TrainerSpec:
    """The `TrainerSpec` of a Megatron trainer from every rank's coordinates and shards (in
    rank order). Checks that the ranks agree on every parameter, that each bulk shard's box
    is exactly what its layout gives the rank, and that every HF parameter is held."""
    coords = [c for c, _ in parts]
    if [c.rank for c in coords] != list(range(len(coords))):
        raise RefitError(f"ranks must be described in order 0..{len(coords) - 1}")
    stages = stage_meshes(coords)
    problems: list[str] = []
    holders: dict[str, list[tuple[Coords, HFShard]]] = {}
    for c, shards in parts:
        for s in shards:
            if not s.mirror:
                holders.setdefault(s.name, []).append((c, s))
    params = []
    for name, held in holders.items():
        c0, s0 = held[0]
        st = stages[c0.pp]
        unlike = [c.rank for c, s in held if s.public() != replace(s0.public(), box=s.box)]
        if unlike:
            problems.append(f"{name!r}: ranks {unlike} describe it unlike rank {c0.rank}")
            continue
        other = sorted({c.pp for c, _ in held} - {c0.pp})
        if other:
            problems.append(f"{name!r} is held in pipeline stages {[c0.pp, *other]}")
            continue
        if s0.misc:
            owner = st.ranks[0]
            if owner not in [c.rank for c, _ in held]:
                problems.append(f"{name!r} (misc) is not held by its stage's first rank {owner}")
                continue
            layout = Layout(Mesh([owner], ("owner",)), [Replicate()], s0.shape)
        else:
            layout = shard_layout(s0, st.dense, st.experts)
            got = {c.rank: s.box for c, s in held}
            want = {int(r): layout.bounds(int(r)) for r in layout.mesh.flat}
            if got != want:
                bad = sorted(r for r in set(got) | set(want) if got.get(r) != want.get(r))
                problems.append(
                    f"{name!r}: layout {layout!r} gives ranks {bad[:4]} "
                    f"{[want.get(r) for r in bad[:4]]}, they hold {[got.get(r) for r in bad[:4]]}"
                )
                continue
        params.append(SourceParam(name, s0.shape, s0.dtype, c0.pp, layout, s0.misc))
    want_names = {p.name for p in hf_params(config)}
    missing = sorted(want_names - set(holders))
    if missing:
        problems.append(f"no rank holds {len(missing)} HF parameters: {missing[:8]}")
    if problems:
        raise RefitError(problems)
    return TrainerSpec(
        world=len(coords),
        stage_ranks=tuple(st.ranks for st in stages),
        params=tuple(params),
        device=device,
    )
