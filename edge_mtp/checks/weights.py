"""The bundle's weights against the checkpoint it is validated against, byte for byte.

Quantization is deterministic: a checkpoint tensor rounded as the bundle's recipe rounds it (ai-edge-quantizer's
symmetric grid, reproduced by export.tables.TableFormat) gives exactly the bytes and scales the bundle must store.
So every weight, norm and RoPE frequency of the checkpoint is looked up, in each encoding the piece's recipe can
give it, among the constants of the bundle's model, and must be found in the piece that computes with it, with the
same scales. Noise in a layer, tensors swapped between layers, a wrong norm, a wrong quantization scale, a wrong RoPE
base or another checkpoint altogether all leave a tensor that is not there; numerics play no part, whatever the recipe.
Vocabulary tables are compared row chunk by row chunk, which also bounds memory at real size.
"""

from __future__ import annotations

import hashlib
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..bundle.litertlm import SECTION_MODEL_TYPES, Section, read_litertlm
from ..contract import DRAFTER, EMBEDDER, PER_LAYER_EMBEDDER, TARGET
from ..errors import EdgeMtpError
from ..export.tables import TableFormat
from ..model.drafter import Drafter
from ..model.loading import TargetCheckpoint

_FLOAT32, _FLOAT16, _INT8, _INT4 = 0, 1, 9, 17
TABLE_CHUNK_ROWS = 8192


@dataclass
class Constant:
    """A constant tensor of a bundle model: the piece it belongs to, its buffer's bytes, and how it is stored."""

    piece: str
    shape: tuple[int, ...]
    data: memoryview
    tensor_type: int
    block: int
    scales: np.ndarray | None  # per-row scales (channelwise) or the block scales (blockwise); None for floats


@dataclass
class WeightReport:
    """What the comparison found: tensors compared per encoding, and every tensor that is not where it should be."""

    compared: dict[str, int] = field(default_factory=dict)  # encoding -> tensors found
    problems: list[str] = field(default_factory=list)

    @property
    def tensors(self) -> int:
        return sum(self.compared.values())

    def add(self, encoding: str) -> None:
        self.compared[encoding] = self.compared.get(encoding, 0) + 1


class ModelConstants:
    """The constants of one TFLite section of a bundle, indexed by the digest of their bytes."""

    def __init__(self, raw: mmap.mmap, section: Section):
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.tools import flatbuffer_utils

        self.raw, self.begin = raw, section.begin
        view = memoryview(raw)[section.begin:section.end]
        try:
            model = flatbuffer_utils.read_model_from_bytearray(view)
        except Exception as e:
            raise EdgeMtpError(f"The {section.model_type} section is not a readable TFLite model ({e}); re-copy or "
                               "re-export the bundle.") from None
        self.by_digest: dict[bytes, list[Constant]] = {}
        self.all: list[Constant] = []
        seen: set[int] = set()
        for subgraph in model.subgraphs:
            for tensor in subgraph.tensors:
                if not tensor.buffer or tensor.buffer in seen:
                    continue
                data = self._bytes(model.buffers[tensor.buffer])
                if data is None:
                    continue
                seen.add(tensor.buffer)
                name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
                block, scales = 0, None
                details = tensor.quantization.details if tensor.quantization is not None else None
                if isinstance(details, schema.BlockwiseQuantizationT):
                    block = details.blockSize
                    scale_buffer = model.buffers[subgraph.tensors[details.scales].buffer]
                    scales = np.frombuffer(self._bytes(scale_buffer) or b"", np.float16)
                elif tensor.quantization is not None and tensor.quantization.scale is not None:
                    scales = np.asarray(tensor.quantization.scale, np.float32)
                constant = Constant(name.split("/", 1)[0], tuple(int(d) for d in tensor.shape), data,
                                    int(tensor.type), block, scales)
                self.by_digest.setdefault(_digest(data), []).append(constant)
                self.all.append(constant)

    def _bytes(self, buffer) -> memoryview | None:
        if buffer.offset and buffer.offset > 1:  # offsets count from the section's start (tied tables run past it)
            start = self.begin + buffer.offset
            return memoryview(self.raw)[start:start + buffer.size]
        if buffer.data is not None and len(buffer.data):
            return memoryview(np.ascontiguousarray(buffer.data)).cast("B")
        return None

    def table(self, piece: str, shape: tuple[int, int]) -> Constant | None:
        """A piece's constant of a table's shape (a vocabulary table is the only one of its shape in its piece)."""
        return next((c for c in self.all if c.piece == piece and c.shape == shape), None)

    def find(self, stored: bytes) -> list[Constant]:
        """The constants holding exactly these bytes."""
        return self.by_digest.get(_digest(stored), [])


def _digest(data) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _encodings(value: np.ndarray, recipe: str) -> Iterator[tuple[str, TableFormat, np.ndarray]]:
    """(encoding name, format, the orientation it applies to) of every way the recipe may have stored a tensor:
    floats stay float32 unless the recipe casts them; matrices may be stored transposed; a blockwise recipe stores a
    matrix whose width the block does not divide channelwise."""
    formats = [("float32", TableFormat(_FLOAT32))]
    if recipe == "fp16":
        formats.insert(0, ("float16", TableFormat(_FLOAT16)))
    elif value.ndim == 2 and recipe != "fp32":
        if recipe == "int8":
            formats.insert(0, ("int8", TableFormat(_INT8)))
        elif recipe.startswith("int4"):
            formats.insert(0, ("int4", TableFormat(_INT4)))
            if "-b" in recipe:
                formats.insert(0, (recipe, TableFormat(_INT4, int(recipe.split("-b")[1]))))
    orientations = [value] + ([np.ascontiguousarray(value.T)] if value.ndim == 2 else [])
    for name, fmt in formats:
        for oriented in orientations:
            if fmt.block and oriented.shape[-1] % fmt.block:
                continue
            yield name, fmt, oriented


def _same_scales(theirs: np.ndarray | None, ours: np.ndarray | None, fold: float) -> bool:
    """Scales equal ours, or ours times the scalar the converter folded into the tensor (to float rounding)."""
    if ours is None or theirs is None:
        return ours is None and theirs is None
    theirs, ours = theirs.reshape(-1).astype(np.float64), ours.reshape(-1).astype(np.float64)
    if fold == 1.0:
        return theirs.shape == ours.shape and np.array_equal(theirs, ours)
    return theirs.shape == ours.shape and bool(np.all(np.abs(theirs - ours * fold) <= 1e-6 * np.abs(ours * fold)))


def _locate(constants: ModelConstants, value: np.ndarray, recipe: str,
            fold: float = 1.0) -> tuple[str | None, set[str]]:
    """(encoding, pieces holding it) of a tensor found with its scales; (None, pieces holding its codes with other
    scales) when it is not. `fold`: a scalar the converter multiplies into this tensor."""
    wrong_scales: set[str] = set()
    for encoding, fmt, oriented in _encodings(value, recipe):
        rows = oriented.reshape(oriented.shape[0], -1) if oriented.ndim > 1 else oriented.reshape(1, -1)
        variants = [rows] if fold == 1.0 else [rows * np.float32(fold), rows / np.float32(1 / fold), rows]
        for variant in variants:
            stored, scales = fmt.quantize(variant)
            found = [c for c in constants.find(stored.tobytes()) if c.tensor_type == fmt.tensor_type]
            folded = 1.0 if variant is not rows or fold == 1.0 else fold
            good = {c.piece for c in found if _same_scales(c.scales, scales, folded)}
            if good:
                return encoding, good
            wrong_scales |= {c.piece for c in found}
    return None, wrong_scales


def _check(report: WeightReport, constants: ModelConstants, name: str, value: torch.Tensor, piece: str,
           recipe: str, fold: float = 1.0) -> None:
    encoding, pieces = _locate(constants, value.detach().float().numpy(), recipe, fold)
    if encoding is not None and piece in pieces:
        report.add(encoding)
    elif encoding is not None:
        report.problems.append(f"{name} is stored in {', '.join(sorted(pieces))}, not in {piece}")
    elif pieces:
        report.problems.append(f"{name} has its values in {', '.join(sorted(pieces))} but other quantization scales")
    else:
        report.problems.append(f"{name} is not in the bundle ({recipe} rounding of the checkpoint's values)")


def _target_parts(spec) -> list[tuple[str, str, list[str]]]:
    """(piece, checkpoint prefix to load, module paths it holds) of the target's decoder pieces."""
    prelude = ["inv_freq_sliding", "inv_freq_full"]
    if spec.ple_dim:
        prelude += ["per_layer_model_projection.", "per_layer_projection_norm."]
    parts = [("prelude", "per_layer_", prelude)]
    parts += [(f"layer_{i}", f"layers.{i}.", [f"layers.{i}."]) for i in range(spec.num_layers)]
    parts.append(("head", "norm", ["norm."]))
    return parts


def check_target(bundle: Path, source: TargetCheckpoint, recipes: dict[str, str], report: WeightReport) -> None:
    """Every decoder weight, norm and RoPE frequency of the checkpoint in the target model, piece by piece."""
    file = read_litertlm(bundle)
    section = file.model_section(SECTION_MODEL_TYPES[TARGET])
    target = source.models.target
    # the PLE projection's 1/sqrt(hidden) (model/target.py) is folded into its weights at conversion
    folds = {"per_layer_model_projection.weight": source.spec.hidden_size ** -0.5}
    with open(bundle, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as raw:
        constants = ModelConstants(raw, section)
        for piece, prefix, paths in _target_parts(source.spec):
            source.load(TARGET, prefix)
            tensors = dict(target.named_parameters()) | dict(target.named_buffers())
            for name, value in tensors.items():
                if any(name.startswith(p) for p in paths) and not value.is_meta and value.is_floating_point():
                    _check(report, constants, f"target {name}", value, piece, recipes.get(piece, "fp32"),
                           folds.get(name, 1.0))
            source.release(TARGET, prefix)
        del constants


def check_drafter(bundle: Path, drafter: Drafter, recipe: str, report: WeightReport) -> None:
    """Every float weight of the assistant in the bundle's drafter model."""
    file = read_litertlm(bundle)
    section = file.model_section(SECTION_MODEL_TYPES[DRAFTER])
    if section is None:
        return
    with open(bundle, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as raw:
        constants = ModelConstants(raw, section)
        for name, value in drafter.named_parameters():
            if value.is_floating_point():
                encoding, pieces = _locate(constants, value.detach().float().numpy(), recipe)
                if encoding is None:
                    report.problems.append(f"drafter {name} is not in the bundle ({recipe} rounding of the "
                                           "assistant's values)" if not pieces else
                                           f"drafter {name} has its values in the bundle but other quantization scales")
                else:
                    report.add(encoding)
        del constants


def _compare_table(report: WeightReport, name: str, table: Constant | None, read_rows, vocab: int, width: int,
                   fold: float = 1.0) -> None:
    """A vocabulary table against the checkpoint's rows, a chunk of rows at a time: the codes of the rows (or of the
    rows times `fold`, the scalar the converter folded in) and their scales."""
    if table is None:
        report.problems.append(f"{name}: the bundle has no [{vocab}, {width}] table")
        return
    fmt = TableFormat(table.tensor_type, table.block)
    row_bytes = len(table.data) // vocab
    scales_per_row = 0 if table.scales is None else table.scales.size // vocab
    for start in range(0, vocab, TABLE_CHUNK_ROWS):
        stop = min(vocab, start + TABLE_CHUNK_ROWS)
        rows = np.asarray(read_rows(start, stop), np.float32)
        theirs = table.data[start * row_bytes:stop * row_bytes]
        their_scales = None if table.scales is None else table.scales.reshape(-1)[start * scales_per_row:
                                                                                  stop * scales_per_row]
        if not _same_rows(fmt, theirs, their_scales, rows, fold):
            report.problems.append(f"{name}: rows {start}-{stop - 1} differ from the checkpoint's")
            return
    report.add(f"table ({vocab} rows)")


def _same_rows(fmt: TableFormat, theirs: memoryview, their_scales: np.ndarray | None, rows: np.ndarray,
               fold: float) -> bool:
    """Stored rows equal the checkpoint's rows rounded by `fmt`. A folded scalar: quantized tables keep the codes of
    the rows (or of the rows times it) and scale their scales by it; float tables hold the rows times it, which the
    converter may round either way (one float32 ulp)."""
    if fmt.tensor_type in (_FLOAT32, _FLOAT16):
        want = fmt.quantize(rows * np.float32(fold))[0]
        if fold == 1.0:
            return bytes(want) == bytes(theirs)
        dtype = np.float32 if fmt.tensor_type == _FLOAT32 else np.float16
        got, expected = np.frombuffer(theirs, dtype).astype(np.float64), want.view(dtype).astype(np.float64)
        ulp = np.abs(np.spacing(want.view(dtype))).astype(np.float64)
        return got.shape == expected.shape and bool(np.all(np.abs(got - expected) <= ulp))
    variants = [(rows, 1.0)] if fold == 1.0 else [(rows * np.float32(fold), 1.0), (rows, fold)]
    return any(bytes(stored) == bytes(theirs) and _same_scales(their_scales, scales, f)
               for stored, scales, f in ((*fmt.quantize(v), f) for v, f in variants))


def check_tables(bundle: Path, source: TargetCheckpoint, report: WeightReport) -> None:
    """The embedder's and per-layer embedder's tables, and the LM head's (the tied table times 1/softcap)."""
    file = read_litertlm(bundle)
    spec = source.spec
    tables = [(EMBEDDER, "embed_tokens.weight", EMBEDDER, 1.0)]
    if spec.ple_dim:
        tables.append((PER_LAYER_EMBEDDER, "embed_tokens_per_layer.weight", PER_LAYER_EMBEDDER, 1.0))
    tables.append((TARGET, "embed_tokens.weight", EMBEDDER, 1 / spec.final_softcap if spec.final_softcap else 1.0))
    with open(bundle, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as raw:
        for model, local, owner, fold in tables:
            entry = source.entry(local, owner)
            vocab, width = entry.shape
            constants = ModelConstants(raw, file.model_section(SECTION_MODEL_TYPES[model]))
            name = "LM head table" if model == TARGET else f"{owner.replace('_', ' ')} table"
            _compare_table(report, name, constants.table("head" if model == TARGET else model, (vocab, width)),
                           lambda a, b: source.rows(entry, a, b).numpy(), vocab, width, fold)
            del constants
