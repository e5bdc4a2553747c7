"""A fine-tuned target given as a PEFT LoRA adapter on a base checkpoint, merged at load: W += B @ A * alpha / r."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import CheckpointReader, assign, resolve_checkpoint
from ..errors import EdgeMtpError
from ..model.loading import TargetCheckpoint, TargetModels, load_target

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def resolve_target(target: str | Path) -> tuple[Path, Path | None]:
    """(base checkpoint directory, adapter directory or None) of a --target value."""
    directory = resolve_checkpoint(target)
    config = directory / ADAPTER_CONFIG
    if not config.is_file():
        return directory, None
    try:
        base = json.loads(config.read_text())["base_model_name_or_path"]
    except (ValueError, KeyError, TypeError):
        raise EdgeMtpError(f"{config} names no base_model_name_or_path; set it to the base checkpoint the adapter "
                           "was trained on.") from None
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise EdgeMtpError(f"{directory} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; save the adapter in "
                           "safetensors form.")
    base_path = Path(base)
    if not base_path.is_absolute() and (directory / base_path).is_dir():
        base_path = directory / base_path
    return resolve_checkpoint(base_path if base_path.is_dir() else base), directory


def adapter_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name -> fp32 weight delta B @ A * scale of every LoRA pair in the adapter."""
    cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    rank, alpha = cfg.get("r", 8), cfg.get("lora_alpha", cfg.get("r", 8))
    scale = alpha / (rank ** 0.5 if cfg.get("use_rslora") else rank)
    reader = CheckpointReader(adapter)
    deltas = {}
    for name in reader.names():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name.removesuffix(".lora_A.weight")
        b_name = module + ".lora_B.weight"
        if b_name not in reader.files:
            raise EdgeMtpError(f"{adapter / ADAPTER_WEIGHTS} has {name} but no {b_name}; the adapter is incomplete.")
        delta = reader.tensor(b_name).float() @ reader.tensor(name).float() * scale
        deltas[module.removeprefix(PEFT_PREFIX) + ".weight"] = delta
    if not deltas:
        raise EdgeMtpError(f"{adapter / ADAPTER_WEIGHTS} holds no LoRA pairs (lora_A/lora_B weights).")
    return deltas


def load_target_or_adapter(base: Path, adapter: Path | None, dtype: torch.dtype = torch.float32) -> TargetModels:
    """The target modules of `base`, with `adapter`'s LoRA deltas merged (checked against the base's shapes)."""
    if adapter is None:
        return load_target(base, dtype)
    deltas = adapter_deltas(adapter)  # before the base loads: a foreign adapter is refused cheaply
    checkpoint = TargetCheckpoint(base)
    by_name = {checkpoint.prefix + e.name: e for e in checkpoint.entries}
    for name, delta in deltas.items():
        entry = by_name.get(name)
        if entry is None or tuple(entry.shape) != tuple(delta.shape):
            found = "no such tensor" if entry is None else f"{list(entry.shape)}, not {list(delta.shape)}"
            raise EdgeMtpError(f"The adapter in {adapter} does not fit the base {base} ({name}: {found}); it was "
                               "trained on another base: point base_model_name_or_path at that one.")
    models = load_target(base, dtype)
    modules = {"embedder": models.embedder, "per_layer_embedder": models.per_layer_embedder, "target": models.target}
    for name, delta in deltas.items():
        entry = by_name[name]
        merged = (checkpoint.read(entry, torch.float32) + delta).to(dtype)
        for owner in entry.modules:
            assign(modules[owner], entry.local, merged)
    return models
