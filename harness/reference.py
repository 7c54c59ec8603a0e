"""HF transformers as the reference the refitted engines are checked against: the prompts,
the trainer's stand-in training step, greedy generation, and byte comparison of tensors."""

from __future__ import annotations

import io
from typing import Any

__all__ = [
    "PROMPTS",
    "hf_generate",
    "hf_model",
    "load_tensors",
    "long_prompt",
    "set_step",
    "tensors_differ",
]


def long_prompt(n: int, seed: int) -> list[int]:
    """`n` deterministic token ids in 1..250 (the tiny models' vocabulary is 256)."""
    return [(i * 37 + seed * 101 + 11) % 250 + 1 for i in range(n)]


# Prompts longer than several KV blocks (the engines use 32-token blocks with prefix caching),
# two sharing a 96-token prefix, asked again after every refit: an engine that kept KV blocks
# computed with the old weights generates something else than HF on the new ones.
PROMPTS = [long_prompt(150, 0), [*long_prompt(96, 0), 7, 8, 9], [100, 3, 42, 17]]


def set_step(rank_obj: Any, path: str, step: int, changed: float | None = None) -> None:
    """Trainer-side 'training step': this rank's shards of `step_weights(base, step)`."""
    from harness.hf_checkpoint import load_grouped
    from harness.tiny_models import step_weights

    full = step_weights(load_grouped(path), step, changed=changed)
    for name, ref in rank_obj.params.items():
        ref.local.copy_(full[name][ref.layout.box(rank_obj.rank)])


def load_tensors(raw: bytes) -> Any:
    """Tensors saved by `torch.save` (weights only: no code runs)."""
    import torch

    return torch.load(io.BytesIO(raw), weights_only=True)


def tensors_differ(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ in shape, dtype or any byte (or are in one dict only)."""
    import torch

    from xfer.program import as_bytes

    bad = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        x, y = a[k], b[k]
        if (
            x.shape != y.shape
            or x.dtype != y.dtype
            or (x.numel() and not torch.equal(as_bytes(x.contiguous()), as_bytes(y.contiguous())))
        ):
            bad.append(k)
    return bad


def hf_model(path: str) -> Any:
    """HF transformers' model of the checkpoint at `path`, in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_generate(
    path_or_model: Any, prompts: list[list[int]], n: int
) -> list[tuple[list[int], list[float]]]:
    """Greedy generation of `n` tokens per prompt: (tokens, their logprobs)."""
    import torch

    model = hf_model(path_or_model) if isinstance(path_or_model, str) else path_or_model
    out = []
    with torch.no_grad():
        for p in prompts:
            g = model.generate(
                torch.tensor([p]),
                max_new_tokens=n,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
            toks = g.sequences[0, len(p) :].tolist()
            lps = [
                float(torch.log_softmax(s[0].float(), -1)[t])
                for s, t in zip(g.scores, toks, strict=True)
            ]
            out.append((toks, lps))
    return out
