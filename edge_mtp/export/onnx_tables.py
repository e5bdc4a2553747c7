"""Vocabulary tables (embedding, per-layer embedding, tied LM head) in ONNX graphs, never held in fp32 whole.

As on the LiteRT path (export/tables.py), a table's piece is exported and quantized with a small vocabulary (its
first rows, a prime count no other dimension shares). `locate_table` finds the table in both graphs and proves that
our chunked encoding of those rows gives the quantizer's very bytes: the encoders call onnxruntime's own quantization
functions (blockwise 4-bit of GatherBlockQuantized / MatMulNBits, quantize_data of the int8 recipe), on row chunks
instead of the whole table. `write_table` then quantizes the real table chunk by chunk straight into the joined data
file, and the returned edit gives every vocabulary-sized dimension of the small graph its real size.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..model.contract import EMBEDDER, PER_LAYER_EMBEDDER
from ..util.errors import EdgeMtpError
from .onnx_data import DataFile, Placed, stored_bytes
from .pieces import HEAD, ROW_CHUNK_BYTES

Encoder = Callable[[np.ndarray], dict[str, np.ndarray]]  # rows [n, W] fp32 -> stored arrays by initializer name
TABLE_PIECES = (EMBEDDER, PER_LAYER_EMBEDDER, HEAD)  # the pieces whose tables export/onnx_format.py writes through here


@dataclass
class OnnxTable:
    """A table in a small-vocabulary piece: the stored initializers (name -> logical dims, vocabulary axis) and
    the encoder that makes their bytes from fp32 rows."""

    small: int
    stored: dict[str, tuple[list[int], int]]
    encode: Encoder
    per_tensor: dict = field(default_factory=dict)  # int8 Gather: the quantizer's arguments, range set by write_table


def _initializers(path: Path) -> dict:
    import onnx

    return {i.name: i for i in onnx.load(str(path), load_external_data=False).graph.initializer}


def locate_table(fp32: Path, quantized: Path, small: int, rows: np.ndarray, recipe: str) -> OnnxTable:
    """The table of a small-vocabulary piece (fp32 export and its quantized version) and a proven encoder."""
    rows = np.asarray(rows, np.float32)
    tables = [i for i in _initializers(fp32).values() if small in i.dims]
    if len(tables) != 1:
        raise EdgeMtpError(f"internal: expected one [{small}, ...] table in {fp32.name}, found {len(tables)}")
    table = tables[0]
    value = np.frombuffer(stored_bytes(table, fp32.parent), np.float32).reshape(list(table.dims))
    axis = list(table.dims).index(small)
    if not np.array_equal(value, rows if axis == 0 else rows.T):
        raise EdgeMtpError(f"internal: the exporter changed the vocabulary table of {fp32.name} beyond a transpose; "
                           "it cannot be widened. Please report it with the checkpoint's config.json.")
    found = {n: i for n, i in _initializers(quantized).items() if n.startswith(table.name) and small in i.dims}
    theirs = {n: stored_bytes(i, quantized.parent) for n, i in found.items()}
    qname = f"{table.name}_quantized"
    qtype = found[qname].data_type if qname in found else None
    for encode, per_tensor in encoders(recipe, table.name, axis, qtype):
        ours = encode(rows)
        if set(ours) == set(theirs) and all(ours[n].tobytes() == theirs[n] for n in ours):
            stored = {n: (list(found[n].dims), list(ours[n].shape).index(small)) for n in ours}
            return OnnxTable(small, stored, encode, per_tensor)
    raise EdgeMtpError(f"internal: edge-mtp's chunked table encoding no longer matches onnxruntime's quantizer "
                       f"('{recipe}', {quantized.name}); please report it with your package versions.")


def encoders(recipe: str, name: str, axis: int, qtype: int | None = None):
    """(encoder, per-tensor arguments) pairs that may reproduce the quantizer's format for `recipe` of a tensor
    stored as initializer `name`: its rows [n, W] as they are (axis 0: a lookup table) or transposed (axis 1: the
    weight B of a MatMul). `qtype`: the ONNX type of the int8 recipe's `<name>_quantized` (int8 or uint8)."""
    from .onnx_quantize import INT4_BLOCKS, fp16_name

    def oriented(r: np.ndarray) -> np.ndarray:
        return r if axis == 0 else np.ascontiguousarray(r.T)

    if recipe == "fp32":
        yield (lambda r: {name: oriented(r)}), {}
    elif recipe == "fp16":
        yield (lambda r: {fp16_name(name): oriented(r).astype(np.float16)}), {}
    elif recipe in INT4_BLOCKS:
        yield _int4(name, axis, INT4_BLOCKS[recipe]), {}
    elif recipe == "int8":
        from onnxruntime.quantization.quant_utils import quantize_data

        qname = f"{name}_quantized"
        for symmetric, reduce_range in itertools.product((False, True), repeat=2):
            if axis == 0:  # Gather: one scale and zero point for the whole table (set from its range later)
                args = {"qtype": qtype, "symmetric": symmetric, "reduce_range": reduce_range, "range": None}

                def encode(r, args=args):
                    lo, hi = args["range"] or (None, None)
                    _, _, q = quantize_data(r, args["qtype"], args["symmetric"], args["reduce_range"],
                                            rmin_override=lo, rmax_override=hi)
                    return {qname: np.asarray(q).reshape(r.shape)}
                yield encode, args
            else:  # MatMul B = table^T, one scale and zero point per vocabulary column
                def encode(r, symmetric=symmetric, reduce_range=reduce_range):
                    q = np.empty(r.T.shape, np.int8 if qtype == 3 else np.uint8)
                    scale, zero = np.empty(len(r), np.float32), np.empty(len(r), q.dtype)
                    for j, column in enumerate(r):
                        zero[j], scale[j], q[:, j] = quantize_data(column, qtype, symmetric, reduce_range)
                    return {qname: q, f"{name}_scale": scale, f"{name}_zero_point": zero}
                yield encode, {}


def _int4(name: str, axis: int, block: int) -> Encoder:
    """GatherBlockQuantized rows (axis 0) or MatMulNBits columns of B = table^T (axis 1), onnxruntime's code."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)

    if axis == 0:
        def blockwise(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            high, low = blocks.max(axis=2, keepdims=True), blocks.min(axis=2, keepdims=True)
            scale = np.where(np.abs(high) > np.abs(low), high, low) / -8.0
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.where(scale == 0, 0, blocks / scale).round().clip(-8, 7).astype(np.int8)
            return q.reshape(len(blocks), -1), scale.reshape(len(blocks), -1)

        def encode(r: np.ndarray) -> dict[str, np.ndarray]:
            # DefaultWeightOnlyQuantizer.quantize_ndarray(r, 1, block, True) vectorized over blocks (its Python loop
            # over the 280 blocks of a PLE row takes minutes on E2B), a shorter last block scaled on its own as
            # there; locate_table proves the bytes equal
            if r.shape[1] % 2:
                raise EdgeMtpError(f"A table of odd width {r.shape[1]} cannot be stored in 4 bits row by row; use "
                                   "int8 for it.")
            full = r.shape[1] // block * block
            parts = [blockwise(r[:, a:b].reshape(len(r), -1, b - a if b - a < block else block))
                     for a, b in ((0, full), (full, r.shape[1])) if b > a]
            q, scale = (np.concatenate([p[i] for p in parts], axis=1) for i in (0, 1))
            packed = ((q[:, 0::2] & 0xF) | ((q[:, 1::2] & 0xF) << 4)).astype(np.uint8)
            return {f"{name}_Q4": packed, f"{name}_scales": scale}
        return encode
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True,
                                                                        accuracy_level=4))

    def encode(r: np.ndarray) -> dict[str, np.ndarray]:
        packed, scales, _ = quantizer.qbits_block_quant(np.ascontiguousarray(r.T))
        return {f"{name}_Q4": packed, f"{name}_scales": scales}
    return encode


def write_table(table: OnnxTable, data: DataFile, read_rows: Callable[[int, int], np.ndarray], full: int,
                on_rows: Callable[[int], None] = lambda n: None) -> tuple[dict[str, Placed], Callable]:
    """Encode the whole table (`full` rows, read `read_rows(a, b)` a chunk at a time) into the data file;
    returns the placed initializers and the edit that widens the small graph to them."""
    import onnx

    placed: dict[str, Placed] = {}
    sizes: dict[str, tuple[int, int]] = {}  # name -> (bytes per vocabulary entry, entries per other axis)
    for name, (dims, axis) in table.stored.items():
        full_dims = [full if k == axis else d for k, d in enumerate(dims)]
        placed[name] = Placed(full_dims, 0, 0)
    if table.per_tensor:  # int8 Gather: the whole table's range first
        lo, hi = np.inf, -np.inf
        for a, b in _chunks(full, read_rows(0, 1).shape[1]):
            rows = read_rows(a, b)
            lo, hi = min(lo, float(rows.min())), max(hi, float(rows.max()))
        table.per_tensor["range"] = (np.float32(lo), np.float32(hi))
    for a, b in _chunks(full, read_rows(0, 1).shape[1]):
        arrays = table.encode(np.asarray(read_rows(a, b), np.float32))
        for name, array in arrays.items():
            axis = table.stored[name][1]
            if name not in sizes:
                other = int(np.prod([d for k, d in enumerate(array.shape) if k != axis]))
                sizes[name] = (array.nbytes // (array.shape[axis] * other), other)
                placed[name].nbytes = array.nbytes // array.shape[axis] * full
                placed[name].offset = data.reserve(placed[name].nbytes)
            item, other = sizes[name]
            if axis == 0:
                os.pwrite(data.fd, array.tobytes(), placed[name].offset + a * item * other)
            else:  # [K, V]: one strided write per row
                for k in range(array.shape[0]):
                    os.pwrite(data.fd, array[k].tobytes(), placed[name].offset + (k * full + a) * item)
        on_rows(b - a)
    scalars = per_tensor_scalars(table.per_tensor, next(iter(table.stored))[:-len("_quantized")]) \
        if table.per_tensor else {}

    def edit(model) -> None:
        """Widen every vocabulary-sized dimension of the small graph (shapes, attributes, shape constants)."""
        small = table.small
        for init in model.graph.initializer:
            if init.name in scalars:
                value = scalars[init.name].astype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
                init.CopyFrom(onnx.numpy_helper.from_array(value.reshape(list(init.dims)), init.name))
            elif init.data_type == onnx.TensorProto.INT64 and init.name not in placed and len(init.dims) == 1 \
                    and init.dims[0] <= 8:
                values = onnx.numpy_helper.to_array(init)
                if (values == small).any():
                    init.CopyFrom(onnx.numpy_helper.from_array(np.where(values == small, full, values), init.name))
        for node in model.graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.INT and attribute.i == small:
                    attribute.i = full
        for info in list(model.graph.output) + list(model.graph.value_info):
            for dim in info.type.tensor_type.shape.dim:
                if dim.HasField("dim_value") and dim.dim_value == small:
                    dim.dim_value = full
    return placed, edit


def per_tensor_scalars(per_tensor: dict, name: str) -> dict[str, np.ndarray]:
    """The scale and zero point (by initializer name) the int8 recipe gives a lookup table `name` of the range
    per_tensor["range"]."""
    from onnxruntime.quantization.quant_utils import quantize_data

    lo, hi = per_tensor["range"]
    zero, scale, _ = quantize_data(np.array([lo, hi], np.float32), per_tensor["qtype"], per_tensor["symmetric"],
                                   per_tensor["reduce_range"], rmin_override=lo, rmax_override=hi)
    return {f"{name}_scale": np.asarray(scale), f"{name}_zero_point": np.asarray(zero)}


def _chunks(rows: int, width: int):
    step = max(1, ROW_CHUNK_BYTES // (4 * width))
    for a in range(0, rows, step):
        yield a, min(rows, a + step)
