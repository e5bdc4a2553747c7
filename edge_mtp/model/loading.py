"""Build our modules from Hugging Face checkpoint directories, one tensor at a time (never two weight copies)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.layout import TensorEntry, drafter_tensors, target_tensors
from ..checkpoint.locate import checkpoint_files, resolve_checkpoint
from ..checkpoint.reading import (CheckpointReader, assign, check_finite, ensure_materialized, open_checkpoint,
                                  shared_layer_leftovers)
from ..checkpoint.spec import (DrafterSpec, TargetSpec, check_pair, drafter_spec_from_config, read_config,
                               target_spec_from_config)
from .drafter import Drafter
from .embedder import Embedder, PerLayerEmbedder
from .kv_quant import KvScales, derive_scales
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


class TargetSource:
    """Target weights offered part by part (see TargetCheckpoint); this base serves models already in memory
    (tests export tampered modules through it): loading and releasing are then no-ops."""

    def __init__(self, models: TargetModels):
        self.models, self.spec, self.directory = models, models.spec, models.path
        self.origin = self.directory  # the checkpoint as named: for a LoRA adapter its folder, `directory` its base's
        self.entries = list(target_tensors(self.spec))
        self.modules = {"embedder": models.embedder, "per_layer_embedder": models.per_layer_embedder,
                        "target": models.target}

    def entry(self, local: str, owner: str = "target") -> TensorEntry:
        """The checkpoint entry behind a module tensor path such as 'embed_tokens.weight'."""
        return next(e for e in self.entries if e.local == local and owner in e.modules)

    def rows(self, entry: TensorEntry, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows [start, stop) of a table."""
        module = self.modules[entry.modules[0]]
        owner, _, attr = entry.local.rpartition(".")
        return getattr(module.get_submodule(owner) if owner else module, attr)[start:stop].detach().to(dtype)

    def load(self, owner: str, local_prefix: str = "", dtype: torch.dtype = torch.float32) -> None:
        """Make the tensors of module `owner` whose path starts with `local_prefix` (e.g. 'layers.3.') available."""

    def release(self, owner: str, local_prefix: str = "") -> None:
        """Let those tensors go again."""


class TargetCheckpoint(TargetSource):
    """A target checkpoint opened for streaming: the modules start on the meta device and are filled (and emptied
    again) part by part, so a real-size export never holds the whole model. A LoRA adapter directory reads as its
    base (config, tokenizer) with the adapter applied to each weight as it is read (checkpoint.AdaptedReader)."""

    def __init__(self, path: str | Path):
        origin = resolve_checkpoint(path)
        directory = checkpoint_files(origin)
        spec = target_spec_from_config(read_config(directory), where=str(directory / "config.json"))
        self.reader = open_checkpoint(origin)
        self.prefix = self.reader.language_prefix()
        leftovers = shared_layer_leftovers(self.prefix, spec.first_shared_layer, spec.num_layers)
        entries = self.reader.check(target_tensors(spec), self.prefix, "target", leftovers)
        models = build_target(spec)
        models.path = directory
        super().__init__(models)
        self.entries, self.origin = entries, origin

    def _entries(self, owner: str, local_prefix: str) -> list[TensorEntry]:
        return [e for e in self.entries if owner in e.modules and e.local.startswith(local_prefix)]

    def read(self, entry: TensorEntry, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One checkpoint tensor in `dtype`, refused if it holds NaN or infinity."""
        value = self.reader.tensor(self.prefix + entry.name)
        check_finite(self.prefix + entry.name, value, str(self.reader.files[self.prefix + entry.name].name))
        return value.to(dtype)

    def rows(self, entry: TensorEntry, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows [start, stop) of a table, read from disk, refused if they hold NaN or infinity."""
        value = self.reader.rows(self.prefix + entry.name, start, stop)
        check_finite(self.prefix + entry.name, value, str(self.reader.files[self.prefix + entry.name].name))
        return value.to(dtype)

    def load(self, owner: str, local_prefix: str = "", dtype: torch.dtype = torch.float32) -> None:
        """Fill the tensors of module `owner` whose path starts with `local_prefix` (e.g. 'layers.3.')."""
        for entry in self._entries(owner, local_prefix):
            assign(self.modules[owner], entry.local, self.read(entry, dtype))

    def release(self, owner: str, local_prefix: str = "") -> None:
        """Return those tensors to the meta device, freeing their memory."""
        for entry in self._entries(owner, local_prefix):
            assign(self.modules[owner], entry.local, torch.empty(entry.shape, device="meta"))


def kv_scales(source: TargetSource) -> tuple[KvScales, ...]:
    """The int8 KV cache's scales per attention type, from the k_norm weights of the target's cache-owning layers."""
    spec, target = source.spec, source.models.target
    weights: dict[str, list] = {}
    for i in spec.kv_layers:
        local = f"layers.{i}.self_attn.k_norm."
        source.load("target", local)
        weights.setdefault(spec.layer_types[i], []).append(target.layers[i].self_attn.k_norm.weight.detach().clone())
        source.release("target", local)
    return tuple(derive_scales(kind, w) for kind, w in sorted(weights.items()))


def use_scales(scales: dict[str, KvScales], target: Target, drafter: Drafter | None) -> None:
    """Give the target and drafter modules the scales of the int8 caches they will be run or traced on."""
    target.kv_scales = scales
    if isinstance(drafter, Drafter):
        drafter.kv_scales = scales


def load_target(path: str | Path, dtype: torch.dtype = torch.float32) -> TargetModels:
    """Target modules from a gemma4 / gemma4_text checkpoint directory (or a cached Hugging Face repo id)."""
    checkpoint = TargetCheckpoint(path)
    for entry in checkpoint.entries:
        value = checkpoint.read(entry, dtype)
        for owner in entry.modules:
            assign(checkpoint.modules[owner], entry.local, value)
    for name, module in checkpoint.modules.items():
        if module is not None:
            ensure_materialized(module, f"{checkpoint.directory} ({name})")
            module.eval()
    return checkpoint.models


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
        check_finite(entry.name, value, str(reader.files[entry.name].name))
        assign(drafter, entry.local, value.to(torch.int32) if entry.role == "ordering" else value.to(dtype))
    ensure_materialized(drafter, str(directory))
    if spec.use_ordered_embeddings:
        drafter.refresh_inverse_ordering()
    return drafter.eval()
