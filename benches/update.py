"""A realistic update model for deltas: how many BF16 weights an RL step changes.

FP32 master weights (initialized like a trained layer's, normal with std `init_std`) take
AdamW steps from `torch.optim.AdamW` at RL learning rates, on gradients of unit scale drawn
afresh each step (Adam normalizes their scale away); after each step the master weights are
cast to BF16, as the trainer does before a refit, and the fraction of BF16 elements whose
bits changed is counted. An update smaller than half a BF16 ulp of the weight is rounded
away, so the fraction grows with the learning rate: the figure the delta path lives on.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["LEARNING_RATES", "adam_changed_fraction"]

LEARNING_RATES = (1e-7, 1e-6, 1e-5)


def adam_changed_fraction(
    lr: float, *, steps: int = 6, numel: int = 1 << 21, init_std: float = 0.02, seed: int = 0
) -> dict[str, Any]:
    """Per step, the fraction of BF16 elements an AdamW step at `lr` changes (the first step
    is Adam's largest: its moments are one gradient)."""
    g = torch.Generator().manual_seed(seed)
    master = torch.nn.Parameter(torch.randn(numel, generator=g) * init_std)
    opt = torch.optim.AdamW([master], lr=lr, weight_decay=0.0)
    before = master.detach().bfloat16()
    fractions = []
    for _ in range(steps):
        master.grad = torch.randn(numel, generator=g)
        opt.step()
        after = master.detach().bfloat16()
        fractions.append(
            float((after.view(torch.int16) != before.view(torch.int16)).float().mean())
        )
        before = after
    return {"lr": lr, "per_step": fractions, "steady": sum(fractions[1:]) / max(1, steps - 1)}
