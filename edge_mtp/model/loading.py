"""Build our modules from Hugging Face checkpoint directories, one tensor at a time (never two weight copies)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import CheckpointReader, assign, ensure_materialized, resolve_checkpoint, shared_layer_leftovers
from ..layout import drafter_tensors, target_tensors
from ..spec import DrafterSpec, TargetSpec, check_pair, drafter_spec_from_config, read_config, target_spec_from_config
from .drafter import Drafter
from .embedder import Embedder, PerLayerEmbedder
from .target import Target


@dataclass
class TargetModels:
    """The three models a target exports to: embedder, per-layer embedder (None without PLE) and the decoder."""

    spec: TargetSpec
    embedder: Embedder
    per_layer_embedder: PerLayerEmbedder | None
    target: Target
    path: Path | None = None


def build_target(spec: TargetSpec) -> TargetModels:
    """Modules of a target spec with meta (unallocated) weights, to be filled by a loader."""
    with torch.device("meta"):
        return TargetModels(spec, Embedder(spec), PerLayerEmbedder(spec) if spec.ple_dim else None, Target(spec))


def load_target(path: str | Path, dtype: torch.dtype = torch.float32) -> TargetModels:
    """Target modules from a gemma4 / gemma4_text checkpoint directory (or a cached Hugging Face repo id)."""
    directory = resolve_checkpoint(path)
    spec = target_spec_from_config(read_config(directory), where=str(directory / "config.json"))
    reader = CheckpointReader(directory)
    prefix = reader.language_prefix()
    models = build_target(spec)
    modules = {"embedder": models.embedder, "per_layer_embedder": models.per_layer_embedder, "target": models.target}
    leftovers = shared_layer_leftovers(prefix, spec.first_shared_layer, spec.num_layers)
    for entry in reader.check(target_tensors(spec), prefix, "target", leftovers):
        value = reader.tensor(prefix + entry.name).to(dtype)
        for owner in entry.modules:
            assign(modules[owner], entry.local, value)
    for name, module in modules.items():
        if module is not None:
            ensure_materialized(module, f"{directory} ({name})")
            module.eval()
    models.path = directory
    return models


def read_drafter_spec(directory: Path) -> DrafterSpec:
    """DrafterSpec from an assistant directory's config.json and generation_config.json."""
    generation_file = directory / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.is_file() else None
    return drafter_spec_from_config(read_config(directory), generation, where=str(directory / "config.json"))


def load_drafter(path: str | Path, target: TargetSpec, dtype: torch.dtype = torch.float32,
                 sliding_window: int | None = None) -> Drafter:
    """Drafter module from a gemma4_assistant checkpoint directory, after checking it belongs to `target`."""
    directory = resolve_checkpoint(path)
    spec = read_drafter_spec(directory)
    check_pair(target, spec)
    reader = CheckpointReader(directory)
    with torch.device("meta"):
        drafter = Drafter(spec, target, sliding_window=sliding_window)
    for entry in reader.check(drafter_tensors(spec), "", "assistant"):
        value = reader.tensor(entry.name)
        assign(drafter, entry.local, value.to(torch.int32) if entry.role == "ordering" else value.to(dtype))
    ensure_materialized(drafter, str(directory))
    return drafter.eval()
