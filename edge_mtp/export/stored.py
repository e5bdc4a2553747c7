"""Where and how a LiteRT model stores each weight: its constants indexed by the digest of their bytes, and the
encodings a recipe may give a float tensor (ai-edge-quantizer's symmetric grid, reproduced by export.tables.TableFormat,
so a tensor rounded here gives exactly the quantizer's bytes and scales).

The export names with it the tensor of each piece that holds each weight; validate looks each checkpoint tensor up
there again (checks/weights.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..util.errors import EdgeMtpError
from .pieces import digest
from .tables import FLOAT16, FLOAT32, INT4, INT8, TableFormat


@dataclass
class Constant:
    """A constant tensor of a bundle model: the piece it belongs to, its buffer's bytes, and how it is stored."""

    name: str
    piece: str
    buffer: int
    shape: tuple[int, ...]
    data: memoryview
    tensor_type: int
    block: int
    scales: np.ndarray | None  # per-row scales (channelwise) or the block scales (blockwise); None for floats


class ModelConstants:
    """The constants of one TFLite section of a bundle, indexed by the digest of their bytes."""

    def __init__(self, raw, begin: int = 0, end: int | None = None, what: str = "model"):
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.tools import flatbuffer_utils

        self.raw, self.begin = raw, begin
        view = memoryview(raw)[begin:end]
        try:
            model = flatbuffer_utils.read_model_from_bytearray(view)
        except Exception as e:
            raise EdgeMtpError(f"The {what} is not a readable TFLite model ({e}); re-copy or re-export the "
                               "bundle.") from None
        self.by_digest: dict[bytes, list[Constant]] = {}
        self.all: list[Constant] = []
        self.by_name: dict[str, Constant] = {}
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
                constant = Constant(name, name.split("/", 1)[0], tensor.buffer, tuple(int(d) for d in tensor.shape), data,
                                    int(tensor.type), block, scales)
                self.by_digest.setdefault(digest(data), []).append(constant)
                self.all.append(constant)
                self.by_name[name] = constant

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

    def named(self, name: str) -> Constant | None:
        """The constant of a tensor name."""
        return self.by_name.get(name)

    def find(self, stored: bytes) -> list[Constant]:
        """The constants holding exactly these bytes."""
        return self.by_digest.get(digest(stored), [])


def encodings(value: np.ndarray, recipe: str) -> Iterator[tuple[str, TableFormat, np.ndarray]]:
    """(encoding name, format, the orientation it applies to) of every way the recipe may have stored a tensor:
    floats stay float32 unless the recipe casts them; matrices may be stored transposed; a blockwise recipe stores a
    matrix whose width the block does not divide channelwise."""
    formats = [("float32", TableFormat(FLOAT32))]
    if recipe == "fp16":
        formats.insert(0, ("float16", TableFormat(FLOAT16)))
    elif value.ndim == 2 and recipe != "fp32":
        if recipe == "int8":
            formats.insert(0, ("int8", TableFormat(INT8)))
        elif recipe.startswith("int4"):
            formats.insert(0, ("int4", TableFormat(INT4)))
            if "-b" in recipe:
                formats.insert(0, (recipe, TableFormat(INT4, int(recipe.split("-b")[1]))))
    orientations = [value] + ([np.ascontiguousarray(value.T)] if value.ndim == 2 else [])
    for name, fmt in formats:
        for oriented in orientations:
            if fmt.block and oriented.shape[-1] % fmt.block:
                continue
            yield name, fmt, oriented


def same_scales(theirs: np.ndarray | None, ours: np.ndarray | None, fold: float) -> bool:
    """Scales equal ours, or ours times the scalar the converter folded into the tensor, to the rounding of the
    scales' own type (one float16 step for block scales; float32 ones to 1e-6)."""
    if ours is None or theirs is None:
        return ours is None and theirs is None
    if theirs.size != ours.size:
        return False
    if fold == 1.0:
        return np.array_equal(theirs.reshape(-1).astype(np.float64), ours.reshape(-1).astype(np.float64))
    want = ours.reshape(-1).astype(np.float64) * fold
    step = np.abs(np.spacing(theirs.reshape(-1))).astype(np.float64) if theirs.dtype == np.float16 \
        else 1e-6 * np.abs(want)
    return bool(np.all(np.abs(theirs.reshape(-1).astype(np.float64) - want) <= step))


def locate(constants: ModelConstants, value: np.ndarray, recipe: str,
            fold: float = 1.0) -> tuple[str | None, list[Constant]]:
    """(encoding, the constants holding it) of a tensor found with its scales; (None, the constants holding its codes
    with other scales) when it is not. `fold`: a scalar the converter multiplies into this tensor."""
    wrong_scales: list[Constant] = []
    for encoding, fmt, oriented in encodings(value, recipe):
        rows = oriented.reshape(oriented.shape[0], -1) if oriented.ndim > 1 else oriented.reshape(1, -1)
        variants = [rows] if fold == 1.0 else [rows * np.float32(fold), rows / np.float32(1 / fold), rows]
        for variant in variants:
            stored, scales = fmt.quantize(variant)
            found = [c for c in constants.find(stored.tobytes()) if c.tensor_type == fmt.tensor_type]
            folded = 1.0 if variant is not rows or fold == 1.0 else fold
            good = [c for c in found if same_scales(c.scales, scales, folded)]
            if good:
                return encoding, good
            wrong_scales += found
    return None, wrong_scales




def converter_folds(hidden_size: int) -> dict[str, float]:
    """Scalars the converter multiplies into weights (weight name -> factor): the PLE projection's 1/sqrt(hidden)
    (model/target.py)."""
    return {"per_layer_model_projection.weight": hidden_size ** -0.5}


def name_weights(path, tensors: dict[str, np.ndarray], recipe: str, folds: dict[str, float]) -> int:
    """Rename the tensors of a converted (and quantized) piece that hold `tensors` to their names (weight name ->
    value), rewriting the file; returns how many were named. The converter's own names are paths of the modules that
    use a tensor, several per fused constant; after this each weight is found by its own name, so validate can tell a
    weight stored under another weight's name. A tensor the converter folded into others keeps its name."""
    from ..formats.tflite import mapped_file, pack, read_tflite

    constants = ModelConstants(mapped_file(path), what=str(path))
    buffers = {}
    for name, value in tensors.items():
        encoding, found = locate(constants, np.asarray(value, np.float32), recipe, folds.get(name, 1.0))
        if encoding is not None and len({c.buffer for c in found}) == 1:
            buffers[found[0].buffer] = name
    del constants
    model = read_tflite(path)
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            if tensor.buffer in buffers:
                tensor.name = buffers[tensor.buffer]
    data = pack(model)
    del model
    path.write_bytes(data)
    return len(buffers)
