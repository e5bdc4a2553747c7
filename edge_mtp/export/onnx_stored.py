"""Where and how an ONNX graph stores each weight: the initializer named after it, and the encodings a recipe gives it.

The export names each checkpoint weight's initializer in its fp32 piece graph after the weight (`name_weights`),
with TRANSPOSED appended when the graph holds the weight's transpose (the B of a MatMul); the quantizers derive
their initializers' names from it (onnx_quantize: `<name>__fp16`; int8: `<name>_quantized`, `_scale`,
`_zero_point`; int4: `<name>_Q4`, `_scales`), and the join puts them under the piece's prefix. validate finds every
checkpoint weight there again and encodes it with onnxruntime's own quantization code (onnx_tables.encoders) to the
very bytes the recipe stores (checks/onnx_weights.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..util.errors import EdgeMtpError
from .onnx_data import stored_bytes
from .onnx_quantize import FP16_MIN_ELEMENTS, INT4_BLOCKS, fp16_name
from .pieces import digest

TRANSPOSED = ".T"  # an initializer holding the transpose of the weight it is named after
FLOAT32, FLOAT16, INT8, INT4 = "float32", "float16", "int8", "int4"
# the stored initializers of each encoding, as suffixes of the name of the weight's initializer
SUFFIXES = {FLOAT32: ("",), FLOAT16: (fp16_name(""),), INT8: ("_quantized", "_scale", "_zero_point"),
            INT4: ("_Q4", "_scales")}


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(int(d) for d in shape if d != 1)


def _common_tail(a: str, b: str) -> int:
    """How many trailing dotted components two names share."""
    x, y = a.split(".")[::-1], b.split(".")[::-1]
    return next((k for k, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))


def name_weights(path: Path, tensors: dict[str, np.ndarray]) -> int:
    """Rename the initializers of an fp32 piece graph (`path`, its .data untouched) that hold `tensors` (weight name
    -> value, as is or transposed) to the weights' names; returns how many were named. Initializers are found by shape
    and the digest of their bytes; among equal ones, the one the exporter named after the weight's module path."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    floats = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    held: dict[tuple, list[str]] = {}  # (squeezed shape, digest of the bytes) -> initializers holding them
    for init in floats:
        held.setdefault((_squeezed(init.dims), digest(stored_bytes(init, path.parent))), []).append(init.name)
    renamed: dict[str, str] = {}
    for name, value in tensors.items():
        value = np.ascontiguousarray(value, np.float32)
        forms = [("", value)] + ([(TRANSPOSED, np.ascontiguousarray(value.T))] if value.ndim == 2 else [])
        for suffix, oriented in forms:
            key = (_squeezed(oriented.shape), digest(oriented.tobytes()))
            hits = [n for n in held.get(key, []) if n not in renamed]
            if hits:
                hit = max(hits, key=lambda n: _common_tail(n, name))
                renamed[hit] = name + suffix
                break
    taken = {o for n in graph.node for o in n.output} | {v.name for v in graph.input} | {i.name for i in floats}
    clash = (set(renamed.values()) & taken) - set(renamed)
    if clash:
        raise EdgeMtpError(f"internal: {path.name} already has a tensor named {sorted(clash)[0]!r}; the weights "
                           "cannot be named after the checkpoint, please report it.")
    for init in graph.initializer:
        init.name = renamed.get(init.name, init.name)
    for node in graph.node:
        if any(n in renamed for n in node.input):
            names = [renamed.get(n, n) for n in node.input]
            del node.input[:]
            node.input.extend(names)
    onnx.save_model(model, str(path))
    return len(renamed)


@dataclass
class StoredWeight:
    """How a graph stores one weight: its initializer's name, orientation, encoding and the initializers it fills."""

    name: str
    axis: int  # 0: the weight as is; 1: its transpose
    encoding: str
    initializers: dict  # initializer name -> TensorProto (external data not loaded)


def stored_weight(initializers: dict, name: str) -> StoredWeight | None:
    """The stored form of weight `name` (its full initializer name, piece prefix included) among a graph's
    initializers, or None when no initializer is named after it."""
    for suffix, axis in (("", 0), (TRANSPOSED, 1)):
        base = name + suffix
        for encoding, parts in SUFFIXES.items():
            if base + parts[0] in initializers:
                return StoredWeight(base, axis, encoding, {base + p: initializers[base + p] for p in parts
                                                           if base + p in initializers})
    return None


def recipe_encodings(recipe: str, elements: int) -> tuple[str, ...]:
    """The encodings a piece's recipe may give a weight of `elements` values: fp16 casts the larger floats; the
    quantizing recipes quantize the weights of MatMuls and lookups and keep the others float32."""
    if recipe == "fp16":
        return (FLOAT16,) if elements >= FP16_MIN_ELEMENTS else (FLOAT32,)
    if recipe == "int8":
        return INT8, FLOAT32
    if recipe in INT4_BLOCKS:
        return INT4, FLOAT32
    return (FLOAT32,)


def encoding_recipe(encoding: str, recipe: str) -> str:
    """The uniform recipe whose encoder gives `encoding` within a piece of `recipe`."""
    return {FLOAT32: "fp32", FLOAT16: "fp16", INT8: "int8"}.get(encoding, recipe)
