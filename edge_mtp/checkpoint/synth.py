"""Random-weight checkpoints in the exact Hugging Face layout, streamed tensor by tensor.

A safetensors file is an 8-byte header length, a JSON header of offsets, then raw data; since every shape is known
from the spec, the header is written first and each tensor is generated and written in row chunks, so even the
e2b preset (4.6 B parameters) is written without holding the model in memory.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..util.atomic import atomic_directory, check_output
from ..util.errors import EdgeMtpError
from .hf_config import drafter_config, generation_config, target_config
from .layout import MULTIMODAL_PREFIX, NORM, ORDERING, SCALAR, TEXT_PREFIX, TensorEntry, drafter_tensors, target_tensors
from .spec import DrafterSpec, TargetSpec
from .char_tokenizer import write_char_tokenizer

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
CHUNK_ELEMENTS = 1 << 20


def _dtype_for(entry: TensorEntry, dtype: torch.dtype) -> torch.dtype:
    return torch.int64 if entry.role == ORDERING else dtype


# Norms that scale what a sublayer adds to the residual stream. In wide models they start at 0.1 (x (1 ± 0.1)): at 1,
# random E2B is chaotic (1e-5 relative weight noise moved its logits 5%, any int4 or int8 rounding changed every top-1
# token), unlike trained models, so no quantized export could be compared with its reference; at 0.1, int4 keeps
# every top-1 token (logit error 0.29), as trained checkpoints do.
RESIDUAL_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm", "post_per_layer_input_norm")


def _chunks(entry: TensorEntry, dtype: torch.dtype, std: float, gen: torch.Generator) -> Iterable[torch.Tensor]:
    """The tensor's values, in row chunks (gemma4.md §5 init: norms/scalars 1 ± 0.1, ordering a permutation; in wide
    models the residual norms 0.1 ± 0.01, see RESIDUAL_NORMS)."""
    if entry.role == ORDERING:
        yield torch.randperm(entry.shape[0], generator=gen)
        return
    rows = entry.shape[0]
    row_size = entry.numel // rows
    step = max(1, CHUNK_ELEMENTS // row_size)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        values = torch.randn((n, *entry.shape[1:]), generator=gen)
        if entry.role in (NORM, SCALAR):
            values = 1.0 + 0.1 * values
            if std < 0.2 and any(n in entry.name for n in RESIDUAL_NORMS):
                values = 0.1 * values
        else:
            values = values * std
        yield values.to(dtype)


def _tensor_seed(seed: int, name: str) -> int:
    """Seed of one tensor from its layout name, so every layout and dtype of a preset holds the same values."""
    return seed * 1_000_003 + sum(ord(ch) * (i + 1) for i, ch in enumerate(name))


def _plan_shards(entries: list[tuple[str, TensorEntry]], dtype: torch.dtype, shard_bytes: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for name, entry in entries:
        nbytes = entry.numel * _dtype_for(entry, dtype).itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, entry))
        size += nbytes
    return shards


def write_safetensors(directory: Path, entries: list[tuple[str, TensorEntry]], dtype: torch.dtype, std: float,
                      seed: int, shard_bytes: int = 2 << 30, progress: Callable[[int], None] | None = None) -> None:
    """Write `entries` (full name, entry) as model.safetensors, or as shards plus an index when over shard_bytes."""
    shards = _plan_shards(entries, dtype, shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for index, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, entry in shard:
            dt = _dtype_for(entry, dtype)
            nbytes = entry.numel * dt.itemsize
            header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(entry.shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(directory / file, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, entry in shard:
                gen = torch.Generator().manual_seed(_tensor_seed(seed, entry.name))
                for chunk in _chunks(entry, _dtype_for(entry, dtype), std, gen):
                    f.write(chunk.contiguous().view(torch.uint8).numpy().tobytes())
                total += entry.numel * _dtype_for(entry, dtype).itemsize
                if progress:
                    progress(total)
    if len(shards) > 1:
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _default_std(hidden: int) -> float:
    """0.2 keeps toy models lively (gemma4.md §5); wide models get 1/sqrt(width) so activations stay finite."""
    return 0.2 if hidden <= 128 else 1.0 / math.sqrt(hidden)


def check_synth_out(directory: Path) -> None:
    """Refuse to replace an existing folder that is not a checkpoint (synth replaces its own output only)."""
    if directory.is_dir() and any(directory.iterdir()) and not (directory / "config.json").is_file():
        raise EdgeMtpError(f"{directory} exists and is not a checkpoint folder; synth would replace it, so choose "
                           "another --out.")


def write_target(directory: Path, spec: TargetSpec, seed: int = 0, multimodal: bool = False,
                 shard_bytes: int = 2 << 30, progress: Callable[[int], None] | None = None) -> None:
    """A random Gemma 4 target checkpoint (config, generation config, tokenizer, safetensors) at `directory`."""
    dtype = getattr(torch, spec.dtype)
    prefix = MULTIMODAL_PREFIX if multimodal else TEXT_PREFIX
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(target_config(spec, multimodal), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(spec), indent=2))
        write_char_tokenizer(tmp, spec.vocab_size)
        entries = [(prefix + e.name, e) for e in target_tensors(spec)]
        write_safetensors(tmp, entries, dtype, _default_std(spec.hidden_size), seed, shard_bytes, progress)


def write_drafter(directory: Path, spec: DrafterSpec, target: TargetSpec, seed: int = 1,
                  shard_bytes: int = 2 << 30, progress: Callable[[int], None] | None = None) -> None:
    """A random Gemma 4 assistant checkpoint for `target` at `directory`."""
    dtype = getattr(torch, spec.dtype)
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(drafter_config(spec), indent=2))
        (tmp / "generation_config.json").write_text(
            json.dumps(generation_config(target, spec.num_assistant_tokens), indent=2))
        entries = [(e.name, e) for e in drafter_tensors(spec)]
        write_safetensors(tmp, entries, dtype, _default_std(spec.hidden_size), seed, shard_bytes, progress)


def total_bytes(spec: TargetSpec | DrafterSpec, entries: Iterable[TensorEntry]) -> int:
    """Bytes the safetensors data of a spec takes."""
    dtype = getattr(torch, spec.dtype)
    return sum(e.numel * _dtype_for(e, dtype).itemsize for e in entries)


def write_pair(out: Path, preset: str, seed: int = 0, dtype: str | None = None, multimodal: bool = False,
               shard_bytes: int = 2 << 30,
               progress: Callable[[str, int, int], None] = lambda what, done, total: None) -> TargetSpec:
    """A random target and its assistant of a preset at out/target and out/assistant (`dtype`: a torch dtype name,
    default the preset's); `progress(what, bytes written, bytes in all)`. Returns the target's spec."""
    from .spec import preset_pair, with_dtype

    target, drafter = preset_pair(preset)
    check_output(out, folder=True)
    for sub in ("target", "assistant"):
        check_synth_out(out / sub)
    if dtype:
        target, drafter = with_dtype(target, dtype), with_dtype(drafter, dtype)
    total = total_bytes(target, target_tensors(target))
    write_target(out / "target", target, seed, multimodal, shard_bytes, lambda done: progress("target", done, total))
    total = total_bytes(drafter, drafter_tensors(drafter))
    write_drafter(out / "assistant", drafter, target, seed + 1, shard_bytes,
                  lambda done: progress("assistant", done, total))
    return target
