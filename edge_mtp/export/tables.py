"""Vocabulary-sized tables (embedding, per-layer embedding, tied LM head) without ever holding them in fp32.

A table's piece is converted and quantized (ai-edge-quantizer) with a small vocabulary: the table's first rows.
`widen` then gives every vocabulary-sized dimension of that small model its real size, and the real table is
quantized here, in row chunks read from the checkpoint, in exactly ai-edge-quantizer's format: symmetric, scale
= max|x| / qmax (int8 per row, narrow range [-127, 127]; 4-bit per block of the row with the scale rounded through
bfloat16 to float16, range [-8, 7], two values per byte, the even one in the low nibble). `check_format` proves
the format on the small model before any real row is written: our bytes must equal the quantizer's.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..formats.tflite import schema
from ..util.errors import EdgeMtpError
from .joiner import BufferData
from .pieces import ROW_CHUNK_BYTES

FLOAT32, FLOAT16, INT8, INT4 = 0, 1, 9, 17  # TFLite tensor types
FLOAT_TYPES = (FLOAT32, FLOAT16)


@dataclass
class TableFormat:
    """How the quantizer stored a table: tensor type, and the block size (0: one scale per row)."""

    tensor_type: int
    block: int = 0

    def quantize(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(stored bytes, scales) of fp32 rows [n, d]: scales [n] (int8), [n, d/block] float16 (4-bit), None (float)."""
        rows = np.asarray(rows, dtype=np.float32)
        if self.tensor_type == FLOAT32:
            return rows.view(np.uint8).reshape(-1), None
        if self.tensor_type == FLOAT16:
            return rows.astype(np.float16).view(np.uint8).reshape(-1), None
        if self.tensor_type == INT8:
            scale = np.maximum(np.abs(rows).max(axis=1), np.float32(1e-9)) / np.float32(127)
            q = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8)
            return q.view(np.uint8).reshape(-1), scale.astype(np.float32)
        if self.tensor_type == INT4 and not self.block:  # channelwise 4-bit: one float32 scale per row
            scale = np.maximum(np.abs(rows).max(axis=1), np.float32(1e-9)) / np.float32(7)
            q = np.clip(np.rint(rows / scale[:, None]), -8, 7).astype(np.int8).reshape(-1)
            return _pack4(q), scale.astype(np.float32)
        if self.tensor_type == INT4:
            n, d = rows.shape
            blocks = rows.reshape(n, d // self.block, self.block)
            scale = np.maximum(np.abs(blocks).max(axis=2), np.float32(1e-9)) / np.float32(7)
            scale = _through_bfloat16(scale).astype(np.float16)
            with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero block's scale underflows to 0 in
                # float16; its values then come out as the quantizer's own (whatever they are, times a zero scale)
                q = np.clip(np.rint(blocks / scale.astype(np.float32)[:, :, None]), -8, 7).astype(np.int8).reshape(-1)
            return _pack4(q), scale
        raise EdgeMtpError(f"internal: table tensor type {self.tensor_type} is not supported")

    def dequantize(self, stored: np.ndarray, scales: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
        """fp32 rows back from stored bytes and scales (what the runtime computes)."""
        n, d = shape
        if self.tensor_type == FLOAT32:
            return stored.view(np.float32).reshape(n, d)
        if self.tensor_type == FLOAT16:
            return stored.view(np.float16).astype(np.float32).reshape(n, d)
        if self.tensor_type == INT8:
            return stored.view(np.int8).reshape(n, d).astype(np.float32) * scales[:, None]
        low = (stored & 0x0F).astype(np.int8)
        high = (stored >> 4).astype(np.int8)
        q = np.empty(stored.size * 2, np.int8)
        q[0::2], q[1::2] = np.where(low > 7, low - 16, low), np.where(high > 7, high - 16, high)
        if not self.block:
            return q[:n * d].reshape(n, d).astype(np.float32) * scales[:, None]
        blocks = q.reshape(n, d // self.block, self.block).astype(np.float32)
        return (blocks * scales.astype(np.float32)[:, :, None]).reshape(n, d)


def _pack4(q: np.ndarray) -> np.ndarray:
    """Two signed 4-bit values per byte, the even-indexed one in the low nibble."""
    if q.size % 2:
        q = np.append(q, np.int8(0))
    return (q[0::2].astype(np.uint8) & 0x0F) | ((q[1::2].astype(np.uint8) & 0x0F) << 4)


def _through_bfloat16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 precision (round to nearest even), kept as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


@dataclass
class TableSlot:
    """A table inside a converted model: its tensor, buffer, and (4-bit) the scales tensor and its buffer."""

    subgraph: int
    tensor: int
    buffer: int
    scales_tensor: int | None
    scales_buffer: int | None
    format: TableFormat


def find_table(model, small: int, width: int) -> TableSlot:
    """The one constant tensor of shape [small, width] in a (quantized) model, and how it is stored."""
    for si, subgraph in enumerate(model.subgraphs):
        for ti, tensor in enumerate(subgraph.tensors):
            if tensor.buffer and list(tensor.shape) == [small, width]:
                details = tensor.quantization.details if tensor.quantization is not None else None
                if isinstance(details, schema().BlockwiseQuantizationT):
                    scales = subgraph.tensors[details.scales]
                    return TableSlot(si, ti, tensor.buffer, details.scales, scales.buffer,
                                     TableFormat(tensor.type, details.blockSize))
                return TableSlot(si, ti, tensor.buffer, None, None, TableFormat(tensor.type))
    raise EdgeMtpError(f"internal: no [{small}, {width}] table in the converted model")


def folded_factor(model, small: int, width: int, rows: np.ndarray) -> np.float32:
    """The scalar a converter folded into a table (1 when none): the LM head's 1/softcap ends up in its weights.

    `model` is the fp32 conversion; the factor must reproduce its table bit for bit, or the widened table would
    not be the graph's.
    """
    slot = find_table(model, small, width)
    stored = np.asarray(model.buffers[slot.buffer].data).view(np.float32).reshape(small, width)
    rows = np.asarray(rows, dtype=np.float32)
    k = np.unravel_index(np.abs(rows).argmax(), rows.shape)
    factor = np.float32(stored[k] / rows[k]) if rows[k] else np.float32(1)
    for candidate in (factor, np.float32(1 / np.float64(1 / factor))):
        if np.array_equal(rows * candidate, stored):
            return np.float32(candidate)
    if np.array_equal((rows.astype(np.float64) * np.float64(factor)).astype(np.float32), stored):
        return factor
    raise EdgeMtpError("internal: the converter changed a vocabulary table beyond a scalar factor; it cannot be "
                       "widened. Please report it with the checkpoint's config.json.")


def check_format(model, slot: TableSlot, rows: np.ndarray) -> None:
    """Our quantization of the small table's rows must give the quantizer's very bytes and scales."""
    stored, scales = slot.format.quantize(rows)
    theirs = np.asarray(model.buffers[slot.buffer].data).view(np.uint8).reshape(-1)
    if slot.scales_buffer is not None:
        their_scales = np.asarray(model.buffers[slot.scales_buffer].data).view(np.float16).reshape(scales.shape)
    elif scales is not None:
        their_scales = np.asarray(model.subgraphs[slot.subgraph].tensors[slot.tensor].quantization.scale, np.float32)
    else:
        their_scales = None
    same_bytes = theirs.shape == stored.shape and np.array_equal(theirs, stored)
    same_scales = scales is None or np.array_equal(np.asarray(their_scales).reshape(-1), scales.reshape(-1))
    if not (same_bytes and same_scales):
        raise EdgeMtpError("internal: edge-mtp's table quantization no longer matches ai-edge-quantizer's format "
                           f"(tensor type {slot.format.tensor_type}); please report it with your package versions.")


class QuantizedTable:
    """A whole table quantized in row chunks into a file (stored bytes) plus its scales (in memory)."""

    def __init__(self, fmt: TableFormat, read_rows: Callable[[int, int], np.ndarray], rows: int, width: int,
                 path: Path, on_rows: Callable[[int], None] = lambda n: None):
        self.format, self.rows, self.width, self.path = fmt, rows, width, path
        chunk = max(1, ROW_CHUNK_BYTES // (4 * width))
        scales = []
        with open(path, "wb") as f:
            for start in range(0, rows, chunk):
                stop = min(rows, start + chunk)
                stored, scale = fmt.quantize(read_rows(start, stop))
                f.write(stored.tobytes())
                if scale is not None:
                    scales.append(scale)
                on_rows(stop - start)
        self.scales = np.concatenate(scales) if scales else None
        self.bytes = os.path.getsize(path)

    def scaled(self, factor: np.float32) -> "QuantizedTable":
        """The same stored bytes read as the table times `factor` (its scales multiplied), e.g. the tied LM head."""
        twin = copy.copy(self)
        twin.scales = (self.scales.astype(np.float32) * factor).astype(self.scales.dtype) if self.scales is not None \
            else self.scales
        return twin

    def stored(self) -> BufferData:
        """The stored bytes, streamed from the file."""
        def chunks() -> Iterator[bytes]:
            with open(self.path, "rb") as f:
                while block := f.read(ROW_CHUNK_BYTES):
                    yield block
        return BufferData(chunks(), self.bytes)

    def rows_back(self, ids: np.ndarray) -> np.ndarray:
        """Dequantized rows for token ids (what the runtime should compute), read back from the file."""
        per_row = self.bytes // self.rows
        out = []
        with open(self.path, "rb") as f:
            for i in np.asarray(ids).reshape(-1):
                f.seek(int(i) * per_row)
                stored = np.frombuffer(f.read(per_row), np.uint8)
                scales = None if self.scales is None else self.scales[int(i):int(i) + 1]
                out.append(self.format.dequantize(stored, scales, (1, self.width)))
        return np.concatenate(out)


def widen(model, slot: TableSlot, small: int, full: int, table: QuantizedTable) -> dict[int, BufferData]:
    """Give every vocabulary axis of a small-vocabulary model its full size; returns the buffers to stream instead.

    Changes tensor shapes, int32 shape constants and per-row quantization parameters in place.
    """
    replaced_buffers = {slot.buffer: table.stored()}
    if slot.scales_buffer is not None:
        replaced_buffers[slot.scales_buffer] = BufferData(table.scales.astype(np.float16))
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            tensor.shape = [full if d == small else d for d in tensor.shape]
            if tensor.shapeSignature is not None:
                tensor.shapeSignature = [full if d == small else d for d in tensor.shapeSignature]
            q = tensor.quantization
            if q is not None and q.scale is not None and len(q.scale) == small:
                q.scale = table.scales.astype(np.float32)
                q.zeroPoint = np.zeros(full, dtype=np.int64)
            if tensor.type == 2 and tensor.buffer and tensor.buffer not in replaced_buffers and len(tensor.shape) == 1:
                data = model.buffers[tensor.buffer].data  # a shape operand: a short int32 vector
                values = np.asarray(data).view(np.int32) if data is not None else None
                if values is not None and values.size <= 8 and (values == small).any():
                    replaced_buffers[tensor.buffer] = BufferData(np.where(values == small, full, values).astype(np.int32))
    return replaced_buffers
