"""The bundle's weights against the checkpoint it is validated against, byte for byte.

Quantization is deterministic: a checkpoint tensor rounded as the bundle's recipe rounds it (ai-edge-quantizer's
symmetric grid, reproduced by export.tables.TableFormat) gives exactly the bytes and scales the bundle must store.
So every weight, norm and RoPE frequency of the checkpoint is looked up, in each encoding the piece's recipe can
give it, among the constants of the bundle's model, and must be found in the piece that computes with it, in the
tensor the export named after it, with the same scales. Noise in a layer, tensors swapped between layers or read
under each other's names, a wrong norm, a wrong quantization scale, a wrong RoPE base or another checkpoint
altogether all leave a tensor that is not where it should be; numerics play no part, whatever the recipe.
Vocabulary tables are compared row chunk by row chunk, which also bounds memory at real size.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..bundle.litertlm import SECTION_MODEL_TYPES, read_litertlm
from ..export.stored import Constant, ModelConstants, converter_folds, locate, same_scales
from ..export.tables import FLOAT_TYPES, TableFormat
from ..model.contract import DRAFTER, EMBEDDER, PER_LAYER_EMBEDDER, TARGET
from ..model.drafter import Drafter
from ..model.loading import TargetCheckpoint

TABLE_CHUNK_ROWS = 8192


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


def _check(report: WeightReport, constants: ModelConstants, name: str, value: torch.Tensor, piece: str | None,
           recipe: str, recorded: str, fold: float = 1.0) -> None:
    """One checkpoint tensor: found in its piece, in the tensor the export named after it (export.stored.name_weights;
    bundles exported before tensors were named are checked by content and piece alone), with its scales."""
    encoding, found = locate(constants, value.detach().float().numpy(), recipe, fold)
    pieces = sorted({c.piece for c in found})
    if encoding is None:
        report.problems.append(f"{name} has its values in {', '.join(pieces)} but other quantization scales" if found
                               else f"{name} is not in the bundle ({recipe} rounding of the checkpoint's values)")
    elif piece is not None and piece not in pieces:
        report.problems.append(f"{name} is stored in {', '.join(pieces)}, not in {piece}")
    elif constants.named(recorded) is not None and recorded not in {c.name for c in found}:
        report.problems.append(f"{name} is stored in another tensor than the one the bundle names for it "
                               "(a weight read under the wrong name)")
    else:
        report.add(encoding)


def target_parts(spec) -> list[tuple[str, str, list[str]]]:
    """(piece, checkpoint prefix to load, module paths it holds) of the target's decoder pieces."""
    prelude = ["inv_freq_sliding", "inv_freq_full"]
    if spec.ple_dim:
        prelude += ["per_layer_model_projection.", "per_layer_projection_norm."]
    parts = [("prelude", "per_layer_", prelude)]
    parts += [(f"layer_{i}", f"layers.{i}.", [f"layers.{i}."]) for i in range(spec.num_layers)]
    parts.append(("head", "norm", ["norm."]))
    return parts


def target_weights(source: TargetCheckpoint) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(piece, name, value) of every float decoder weight, norm and RoPE frequency of the target, one piece loaded at
    a time."""
    target = source.models.target
    for piece, prefix, paths in target_parts(source.spec):
        source.load(TARGET, prefix)
        tensors = dict(target.named_parameters()) | dict(target.named_buffers())
        for name, value in tensors.items():
            if any(name.startswith(p) for p in paths) and not value.is_meta and value.is_floating_point():
                yield piece, name, value
        source.release(TARGET, prefix)


def _section_constants(raw: mmap.mmap, bundle: Path, model: str) -> ModelConstants | None:
    section = read_litertlm(bundle).model_section(SECTION_MODEL_TYPES[model])
    return None if section is None else ModelConstants(raw, section.begin, section.end, f"{section.model_type} section")


def check_target(bundle: Path, source: TargetCheckpoint, recipes: dict[str, str], report: WeightReport) -> None:
    """Every decoder weight, norm and RoPE frequency of the checkpoint in the target model, piece by piece."""
    folds = converter_folds(source.spec.hidden_size)
    with open(bundle, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as raw:
        constants = _section_constants(raw, bundle, TARGET)
        for piece, name, value in target_weights(source):
            _check(report, constants, f"target {name}", value, piece, recipes.get(piece, "fp32"), f"{piece}/{name}",
                   folds.get(name, 1.0))
        del constants


def check_drafter(bundle: Path, drafter: Drafter, recipe: str, report: WeightReport) -> None:
    """Every float weight of the assistant in the bundle's drafter model."""
    with open(bundle, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as raw:
        constants = _section_constants(raw, bundle, DRAFTER)
        if constants is None:
            return
        for name, value in drafter.named_parameters():
            if value.is_floating_point():
                _check(report, constants, f"drafter {name}", value, None, recipe, name)
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
    if fmt.tensor_type in FLOAT_TYPES:
        want = fmt.quantize(rows * np.float32(fold))[0]
        if fold == 1.0:
            return bytes(want) == bytes(theirs)
        dtype = np.float32 if fmt.tensor_type == FLOAT_TYPES[0] else np.float16
        got, expected = np.frombuffer(theirs, dtype).astype(np.float64), want.view(dtype).astype(np.float64)
        ulp = np.abs(np.spacing(want.view(dtype))).astype(np.float64)
        return got.shape == expected.shape and bool(np.all(np.abs(got - expected) <= ulp))
    variants = [(rows, 1.0)] if fold == 1.0 else [(rows * np.float32(fold), 1.0), (rows, fold)]
    return any(bytes(stored) == bytes(theirs) and same_scales(their_scales, scales, f)
               for stored, scales, f in ((*fmt.quantize(v), f) for v, f in variants))


def check_tables(bundle: Path, source: TargetCheckpoint, report: WeightReport) -> None:
    """The embedder's and per-layer embedder's tables, and the LM head's (the tied table times 1/softcap)."""
    spec = source.spec
    tables = [(EMBEDDER, "embed_tokens.weight", EMBEDDER, 1.0)]
    if spec.ple_dim:
        tables.append((PER_LAYER_EMBEDDER, "embed_tokens_per_layer.weight", PER_LAYER_EMBEDDER, 1.0))
    tables.append((TARGET, "embed_tokens.weight", EMBEDDER, 1 / spec.final_softcap if spec.final_softcap else 1.0))
    with open(bundle, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as raw:
        for model, local, owner, fold in tables:
            entry = source.entry(local, owner)
            vocab, width = entry.shape
            constants = _section_constants(raw, bundle, model)
            name = "LM head table" if model == TARGET else f"{owner.replace('_', ' ')} table"
            _compare_table(report, name, constants.table("head" if model == TARGET else model, (vocab, width)),
                           lambda a, b: source.rows(entry, a, b).numpy(), vocab, width, fold)
            del constants
