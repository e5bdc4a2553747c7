"""Reading Hugging Face safetensors checkpoints lazily, tensor by tensor, with errors that name file and tensor."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from .errors import CheckpointError, EdgeMtpError
from .layout import MULTIMODAL_PREFIX, TEXT_PREFIX, TensorEntry

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors that may sit in a Gemma 4 checkpoint but never feed the text export.
IGNORED_PREFIXES = ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.",
                    "lm_head.")
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I64": torch.int64,
           "I32": torch.int32}
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
                if not all(isinstance(n, str) and isinstance(f, str) and "/" not in f and f not in ("", ".", "..")
                           for n, f in weight_map.items()):
                    raise ValueError
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # JSON and UTF-8 errors too
                raise CheckpointError(f"{index} is not a valid safetensors index (a 'weight_map' from tensor names "
                                      "to shard files in the same folder); re-download it.") from None
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
        self._layouts: dict[Path, dict] = {}
        self._data_start: dict[Path, int] = {}

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
        """Read one tensor (with pread, so no mapped checkpoint pages stay resident)."""
        return self.rows(name, 0, None)

    def rows(self, name: str, start: int, stop: int | None) -> torch.Tensor:
        """Rows [start, stop) of a tensor along its first axis (stop None: to the end), read from disk."""
        file = self.files[name]
        try:
            dtype, shape, (begin, end) = self._layout(file)[name]
            row_bytes = (end - begin) // max(shape[0], 1) if shape else end - begin
            stop = (shape[0] if shape else 1) if stop is None else stop
            if not 0 <= start <= stop <= (shape[0] if shape else 1):
                raise CheckpointError(f"internal: rows {start}:{stop} of {name} are outside its {shape[:1]} rows")
            data = bytearray((stop - start) * row_bytes)
            with open(file, "rb") as f:
                f.seek(self._data_start[file] + begin + start * row_bytes)
                if f.readinto(data) != len(data):
                    raise ValueError("file ends early")
            out = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            return out.reshape([stop - start, *shape[1:]] if shape else [])
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"Cannot read tensor {name} from {file.name}: {e}; the file is truncated or "
                                  "corrupt (re-download it).") from None

    def _layout(self, file: Path) -> dict[str, tuple[torch.dtype, list[int], tuple[int, int]]]:
        """dtype, shape and byte range of every tensor of one shard, from its safetensors header."""
        if file not in self._layouts:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if size > os.fstat(f.fileno()).st_size - 8:
                    raise CheckpointError(f"{file.name} is truncated or not safetensors (its header claims {size} "
                                          "bytes); re-download it.")
                header = json.loads(f.read(size))
            self._data_start[file] = 8 + size
            layout = {}
            for tensor, meta in header.items():
                if tensor == "__metadata__":
                    continue
                if meta["dtype"] not in _DTYPES:
                    raise CheckpointError(f"Tensor {tensor} in {file.name} has dtype {meta['dtype']}; edge-mtp reads "
                                          f"{', '.join(_DTYPES)} checkpoints.")
                layout[tensor] = (_DTYPES[meta["dtype"]], list(meta["shape"]), tuple(meta["data_offsets"]))
            self._layouts[file] = layout
        return self._layouts[file]

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


@contextmanager
def swapped(module: torch.nn.Module, local: str, value: torch.Tensor) -> Iterator[None]:
    """Put `value` at a module tensor path for the duration of a block, then put the previous tensor back."""
    owner, _, attr = local.rpartition(".")
    holder = module.get_submodule(owner) if owner else module
    previous = getattr(holder, attr)
    assign(module, local, value)
    try:
        yield
    finally:
        assign(module, local, previous)


def ensure_materialized(module: torch.nn.Module, what: str) -> None:
    """Fail loudly if any parameter or buffer was never loaded."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_meta:
            raise CheckpointError(f"{what}: tensor {name} was never loaded.")


def check_finite(name: str, value: torch.Tensor, where: str) -> None:
    """Refuse weights holding NaN or infinity (a broken fine-tune or a bad conversion) before any export work."""
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise CheckpointError(f"Tensor {name} in {where} contains NaN or infinite values; the checkpoint is broken "
                              "(re-download it, or fix the fine-tune that produced it).")
