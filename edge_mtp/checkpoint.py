"""Reading Hugging Face safetensors checkpoints lazily, tensor by tensor, with errors that name file and tensor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from .errors import CheckpointError, EdgeMtpError
from .layout import MULTIMODAL_PREFIX, TEXT_PREFIX, TensorEntry

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors that may sit in a Gemma 4 checkpoint but never feed the text export.
IGNORED_PREFIXES = ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.",
                    "lm_head.")
SHARED_LAYER_UNUSED = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight",
                       "self_attn.v_norm.weight")


def resolve_checkpoint(path_or_repo: str | Path) -> Path:
    """A checkpoint directory from a local path, or from a Hugging Face repo id already in the local cache."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo)
    if path.exists():
        raise EdgeMtpError(f"{path} is a file; pass the checkpoint directory that holds config.json.")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(repo_id=text, local_files_only=True))
        except Exception:
            raise EdgeMtpError(f"'{text}' is neither a directory nor a repo in the local Hugging Face cache; download "
                               "it first (huggingface-cli download) or pass a checkpoint directory.") from None
    raise EdgeMtpError(f"Checkpoint directory {path} does not exist.")


class CheckpointReader:
    """Index of a (possibly sharded) safetensors checkpoint; tensors are read one at a time from mmap'd files."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files: dict[str, Path] = {}
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise CheckpointError(f"{index} is not a valid safetensors index (no 'weight_map').") from None
            for name, file in weight_map.items():
                self.files[name] = directory / file
            for file in sorted(set(self.files.values())):
                if not file.is_file():
                    raise CheckpointError(f"Shard {file.name} listed in {index.name} is missing from {directory}.")
        else:
            shards = sorted(directory.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"No safetensors weights in {directory} (expected {SINGLE_FILE} or {INDEX_FILE}).")
            for file in shards:
                for name in self._open(file).keys():
                    self.files[name] = file
        self._handles: dict[Path, object] = {}

    def _open(self, file: Path):
        try:
            return safe_open(str(file), framework="pt")
        except Exception as e:
            raise CheckpointError(f"Cannot read {file}: {e}; the file is truncated or not safetensors.") from None

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = self._open(file)
        return self._handles[file]

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor without reading its data."""
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor."""
        try:
            return self._handle(self.files[name]).get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"Cannot read tensor {name} from {self.files[name].name}: {e}") from None

    def language_prefix(self) -> str:
        """'model.language_model.' for multimodal Gemma 4 checkpoints, 'model.' for text-only ones."""
        if any(n.startswith(MULTIMODAL_PREFIX) for n in self.files):
            return MULTIMODAL_PREFIX
        return TEXT_PREFIX

    def check(self, entries: Iterable[TensorEntry], prefix: str, what: str,
              ignorable: Iterable[str] = ()) -> list[TensorEntry]:
        """Verify that every expected tensor exists with its shape and that nothing unexpected matters."""
        entries = list(entries)
        expected = {prefix + e.name: e for e in entries}
        for full, entry in expected.items():
            if full not in self.files:
                raise CheckpointError(f"{what} checkpoint {self.directory} lacks tensor {full}; the weights do not "
                                      "match config.json (incomplete download or wrong model).")
            shape = self.shape(full)
            if shape != entry.shape:
                raise CheckpointError(f"Tensor {full} in {self.files[full].name} has shape {list(shape)} but "
                                      f"config.json implies {list(entry.shape)}.")
        ignorable = set(ignorable)
        for name in self.files:
            if name in expected or name in ignorable or name.startswith(IGNORED_PREFIXES):
                continue
            raise CheckpointError(f"Unexpected tensor {name} in {self.files[name].name}: the {what} checkpoint does "
                                  "not match its config.json.")
        return entries


def shared_layer_leftovers(prefix: str, first_shared: int, num_layers: int) -> list[str]:
    """Names of the k/v weights of KV-shared layers, which checkpoints may contain but which are never used."""
    return [f"{prefix}layers.{i}.{n}" for i in range(first_shared, num_layers) for n in SHARED_LAYER_UNUSED]


def assign(module: torch.nn.Module, local: str, value: torch.Tensor) -> None:
    """Put `value` at dotted path `local` of `module`, as a frozen parameter or a buffer, replacing any meta tensor."""
    owner_path, _, attr = local.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if attr in owner._parameters:
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise KeyError(f"{type(module).__name__} has no tensor {local}")


def ensure_materialized(module: torch.nn.Module, what: str) -> None:
    """Fail loudly if any parameter or buffer was never loaded."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_meta:
            raise CheckpointError(f"{what}: tensor {name} was never loaded.")
