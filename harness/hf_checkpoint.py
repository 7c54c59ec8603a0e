"""HF checkpoints on disk <-> refit's canonical tensors (experts grouped ``[E, ...]``).

`load_grouped(path)` reads every ``*.safetensors`` file of a checkpoint directory and groups
per-expert tensors (`refit.hf.split_expert_name`); `save_grouped(tensors, config, path)`
writes the inverse (per-expert names, as HF checkpoints store them) with the config, so HF
transformers or vLLM can load it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from refit.hf import split_expert_name, ungroup

__all__ = ["load_grouped", "save_grouped"]


def load_grouped(path: str | Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    flat: dict[str, torch.Tensor] = {}
    for f in files:
        flat.update(load_file(str(f)))
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in flat.items():
        hit = split_expert_name(name)
        if hit is None:
            out[name] = t
        else:
            experts.setdefault(hit[0], {})[hit[1]] = t
    for group, by_e in experts.items():
        out[group] = torch.stack([by_e[e] for e in range(len(by_e))])
    return out


def save_grouped(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], path: str | Path
) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = {n: x.contiguous() for name, t in tensors.items() for n, x in ungroup(name, t)}
    save_file(flat, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(dict(config), indent=1))
