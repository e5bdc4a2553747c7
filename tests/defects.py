"""Checkpoints a bundle does not come from: copies of a target checkpoint with one defect each.

A bundle exported from the original must fail `validate` against every one of them, at every recipe (and one exported
from a defective copy must fail against the original: the same mismatch seen from the other side).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

Tensors = dict[str, torch.Tensor]


def _named(tensors: Tensors, suffix: str) -> str:
    return next(n for n in tensors if n.endswith(suffix))


def _noise(tensors: Tensors) -> None:
    """Noise of 5% of the weights' spread in one layer's MLP output projection."""
    name = _named(tensors, "layers.1.mlp.down_proj.weight")
    w = tensors[name].float()
    generator = torch.Generator().manual_seed(0)
    tensors[name] = (w + 0.05 * w.std() * torch.randn(w.shape, generator=generator)).to(tensors[name].dtype)


def _swapped(tensors: Tensors) -> None:
    """The attention output projections of the first two layers of the same shape exchanged."""
    names = sorted((n for n in tensors if n.endswith("self_attn.o_proj.weight")),
                   key=lambda n: int(n.split("layers.")[1].split(".")[0]))
    a, b = next((a, b) for i, a in enumerate(names) for b in names[i + 1:] if tensors[a].shape == tensors[b].shape)
    tensors[a], tensors[b] = tensors[b], tensors[a]


def _norm(tensors: Tensors) -> None:
    """One layer's pre-attention norm 10% too large."""
    name = _named(tensors, "layers.1.input_layernorm.weight")
    tensors[name] = (tensors[name].float() * 1.1).to(tensors[name].dtype)


def _scale(tensors: Tensors) -> None:
    """One projection scaled by 1.5 as a whole (its rounded codes are unchanged: only the quantization scales move)."""
    name = _named(tensors, "layers.1.self_attn.q_proj.weight")
    tensors[name] = (tensors[name].float() * 1.5).to(tensors[name].dtype)


def _mismapped(tensors: Tensors) -> None:
    """The MLP's gate and up projections read from each other's names, in every layer (a loader mapping bug)."""
    for gate in [n for n in tensors if n.endswith("mlp.gate_proj.weight")]:
        up = gate.replace("gate_proj", "up_proj")
        tensors[gate], tensors[up] = tensors[up], tensors[gate]


def _rope(config: dict) -> None:
    """The full-attention layers' RoPE base 10x too large."""
    text = config.get("text_config", config)
    text["rope_parameters"]["full_attention"]["rope_theta"] *= 10


WEIGHT_DEFECTS: dict[str, Callable[[Tensors], None]] = {
    "noise": _noise, "swapped": _swapped, "norm": _norm, "scale": _scale, "mismapped": _mismapped}
CONFIG_DEFECTS: dict[str, Callable[[dict], None]] = {"rope": _rope}
DEFECTS = (*WEIGHT_DEFECTS, *CONFIG_DEFECTS)


class _Lazy(dict):
    """A checkpoint's tensors by name, read from their shard when first used; what a defect assigns is noted."""

    def __init__(self, files: dict[str, Path]):
        super().__init__({name: None for name in files})
        self.files, self.changed = files, set()

    def __getitem__(self, name: str) -> torch.Tensor:
        value = super().__getitem__(name)
        if value is None:
            with safe_open(str(self.files[name]), framework="pt") as f:
                value = f.get_tensor(name)
            super().__setitem__(name, value)
        return value

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.changed.add(name)
        super().__setitem__(name, value)


def defective_copy(checkpoint: Path, defect: str, out: Path) -> Path:
    """A copy of `checkpoint` at `out` with one defect (a name of DEFECTS). Shards the defect does not touch are linked,
    not copied, so a real-size checkpoint costs only the shard it changes."""
    out.mkdir(parents=True)
    for path in checkpoint.iterdir():
        if path.suffix == ".safetensors":
            (out / path.name).symlink_to(path.resolve())
        elif path.is_file():
            shutil.copy(path, out / path.name)
    if defect in CONFIG_DEFECTS:
        config = json.loads((out / "config.json").read_text())
        CONFIG_DEFECTS[defect](config)
        (out / "config.json").write_text(json.dumps(config, indent=2))
        return out
    index = out / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            weight_map = {name: "model.safetensors" for name in f.keys()}
    tensors = _Lazy({name: out / file for name, file in weight_map.items()})
    WEIGHT_DEFECTS[defect](tensors)
    for shard in sorted({weight_map[n] for n in tensors.changed}):  # rewritten whole: loaders read every tensor
        names = [n for n, f in weight_map.items() if f == shard]
        values = {n: tensors[n].contiguous() for n in names}
        (out / shard).unlink()
        save_file(values, out / shard, metadata={"format": "pt"})
    return out
