"""Reading Hugging Face safetensors checkpoints lazily, tensor by tensor, with errors that name file and tensor; a
LoRA adapter directory reads as its base with the adapter applied to each weight as it is read."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from ..util.errors import CheckpointError
from .layout import MULTIMODAL_PREFIX, TEXT_PREFIX, TensorEntry
from .locate import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_base

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors that may sit in a Gemma 4 checkpoint but never feed the text export.
IGNORED_PREFIXES = ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.",
                    "lm_head.")
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I64": torch.int64,
           "I32": torch.int32}
PEFT_PREFIX = "base_model.model."  # PEFT's names for the wrapped model's tensors
SHARED_LAYER_UNUSED = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight",
                       "self_attn.v_norm.weight")


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


def open_checkpoint(directory: Path) -> CheckpointReader:
    """The reader of a checkpoint directory; for a LoRA adapter directory, its base read through the adapter."""
    base = adapter_base(directory)
    return CheckpointReader(directory) if base is None else AdaptedReader(base, directory)


class AdaptedReader(CheckpointReader):
    """A base checkpoint read through a PEFT LoRA adapter: each adapted weight is W + scale * B @ A, in fp32,
    computed when that weight (or rows of it) is read. Peak memory stays bounded by one tensor as for a plain
    checkpoint (the read rows, their delta, and the adapter's small A and B), and nothing merged is ever stored."""

    def __init__(self, base: Path, adapter: Path):
        super().__init__(base)
        self.adapter = adapter
        self.lora = CheckpointReader(adapter)
        config = adapter / ADAPTER_CONFIG
        try:
            cfg = json.loads(config.read_text())
            rank = cfg.get("r", 8)
            alpha = cfg.get("lora_alpha", rank)
            self.scale = float(alpha) / (rank ** 0.5 if cfg.get("use_rslora") else rank)
        except (ValueError, TypeError, ZeroDivisionError, AttributeError, RecursionError):
            raise CheckpointError(f"{config} does not hold a LoRA rank 'r' and 'lora_alpha' as numbers; save the "
                                  "adapter again with PEFT.") from None
        self.pairs = self._pairs()

    def _pairs(self) -> dict[str, tuple[str, str]]:
        """Base tensor name -> (lora_A, lora_B) names, every pair checked against the base's names and shapes."""
        weights, pairs = self.adapter / ADAPTER_WEIGHTS, {}
        for name in self.lora.names():
            module, _, kind = name.rpartition(".lora_")
            if not module or kind not in ("A.weight", "B.weight"):
                raise CheckpointError(f"{weights} holds {name}, which is not a LoRA A/B weight; edge-mtp applies "
                                      "LoRA pairs only (no modules_to_save, embedding or DoRA tensors).")
            a_name, b_name = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
            if a_name not in self.lora.files or b_name not in self.lora.files:
                raise CheckpointError(f"{weights} has {name} but not its partner; the adapter is incomplete.")
            a, b = self.lora.shape(a_name), self.lora.shape(b_name)
            if len(a) != 2 or len(b) != 2 or b[1] != a[0]:
                raise CheckpointError(f"{weights}: {b_name} {list(b)} times {a_name} {list(a)} is no matrix "
                                      "product; the adapter is corrupt.")
            target = module.removeprefix(PEFT_PREFIX) + ".weight"
            found = self.shape(target) if target in self.files else None
            if found != (b[0], a[1]):
                why = "no such tensor" if found is None else f"{list(found)}, not {[b[0], a[1]]}"
                raise CheckpointError(f"The adapter in {self.adapter} does not fit the base {self.directory} "
                                      f"({target}: {why}); point base_model_name_or_path in {ADAPTER_CONFIG} at the "
                                      "base it was trained on.")
            pairs[target] = (a_name, b_name)
        if not pairs:
            raise CheckpointError(f"{weights} holds no LoRA pairs (lora_A/lora_B weights).")
        return pairs

    def rows(self, name: str, start: int, stop: int | None) -> torch.Tensor:
        """Rows [start, stop) of a tensor, with the adapter's delta added in fp32 where it adapts that tensor."""
        value = super().rows(name, start, stop)
        if name not in self.pairs:
            return value
        a, b = self.pairs[name]
        delta = self.lora.rows(b, start, stop).float() @ self.lora.tensor(a).float()
        return delta.mul_(self.scale).add_(value)  # in place: the read rows and one fp32 block are all it holds


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
