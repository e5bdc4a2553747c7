"""Quantization recipes for ONNX graphs (onnxruntime.quantization), applied one graph file at a time.

The recipe names are export/options.py's, shared with LiteRT, and mean the same thing:
  fp32        no quantization
  fp16        fp16 weights on disk, each followed by a Cast to fp32 (compute stays fp32, as LiteRT's fp16)
  int8        channelwise int8 MatMul weights with dynamic int8 activations (quantize_dynamic, MatMulConstBOnly);
              embedding tables (Gather) int8 too
  int4        4-bit blockwise MatMul weights (MatMulNBits, block 32, accuracy level 4 = int8 activations) and 4-bit
              blockwise embedding tables (GatherBlockQuantized); int4-b32 / int4-b64 / int4-b128 pick the block
  mixed       4-bit for the embedding tables and the target, 8-bit for the drafter and for any component whose
              4-bit error, measured on random inputs, exceeds driver.MIXED_SENSITIVITY (the LiteRT rule)

Both onnxruntime writers append to an existing external-data file, so the destination is always removed first.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from ..util.errors import EdgeMtpError
from .options import check_recipe

INT4_BLOCKS = {"int4": 32, "int4-b32": 32, "int4-b64": 64, "int4-b128": 128}
FP16_MIN_ELEMENTS = 256  # smaller float initializers (norm scales, rope tables) stay fp32
INLINE_BYTES = 1024  # onnx.save_model keeps a tensor inline below this (its size_threshold, on sys.getsizeof)
MATMUL_OPS = ("MatMul", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "Gemm")
GATHER_OPS = ("Gather", "GatherBlockQuantized")

def data_file(path: Path) -> Path:
    """The external-data file of a graph (`x.onnx` -> `x.onnx.data`)."""
    return path.with_name(path.name + ".data")


def graph_files(path: Path) -> list[Path]:
    """The graph file and its external data, where present."""
    return [p for p in (path, data_file(path)) if p.is_file()]


def graph_bytes(path: Path) -> int:
    """Bytes on disk of a graph with its external data."""
    return sum(p.stat().st_size for p in graph_files(path))


def remove_graph(path: Path) -> None:
    """Delete a graph and its external data."""
    for p in (path, data_file(path)):
        p.unlink(missing_ok=True)


def _publish(dst: Path) -> None:
    for p in graph_files(dst):  # the quantizers write 0600; a bundle's files are readable like the fp32 ones
        os.chmod(p, 0o644)


def quantize_graph(src: Path, recipe: str, dst: Path) -> Path:
    """Write `dst` (+ `dst`.data), the graph `src` under a uniform recipe (fp32, fp16, int8, int4[-bN]).

    `src` and `dst` must be different files; `src` is left untouched.
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("quantize_graph writes a new file")
    remove_graph(dst)
    if recipe == "fp32":
        shutil.copyfile(src, dst)
        if data_file(src).is_file():
            shutil.copyfile(data_file(src), data_file(dst))
    elif recipe == "fp16":
        _fp16_weights(src, dst)
    elif recipe == "int8":
        _int8(src, dst)
    elif recipe in INT4_BLOCKS:
        _int4(src, dst, INT4_BLOCKS[recipe])
    else:
        check_recipe(recipe)
        raise EdgeMtpError(f"Recipe '{recipe}' is decided per component; quantize_graph takes fp32, fp16, int8 or "
                           "int4[-bN].")
    _publish(dst)
    return dst


def save_graph(model, dst: Path) -> None:
    """Save a graph with its larger tensors in `dst`.data (the layout every recipe writes)."""
    import onnx

    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_file(dst).name, size_threshold=INLINE_BYTES)


def fp16_name(name: str) -> str:
    """The fp16 initializer that stands for fp32 initializer `name` under the fp16 recipe."""
    return f"{name}__fp16"


def fp16_cast(name: str):
    """The Cast node that gives fp32 `name` back from its fp16 initializer."""
    from onnx import TensorProto, helper

    return helper.make_node("Cast", [fp16_name(name)], [name], to=TensorProto.FLOAT, name=f"{name}__cast")


def _fp16_weights(src: Path, dst: Path) -> None:
    """Store every large fp32 initializer as fp16 followed by a Cast back to fp32."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    casts, keep = [], []
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) >= FP16_MIN_ELEMENTS:
            array = numpy_helper.to_array(init)
            keep.append(numpy_helper.from_array(array.astype(np.float16), fp16_name(init.name)))
            casts.append(fp16_cast(init.name))
        else:
            keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    save_graph(model, dst)


def _int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gather"], use_external_data_format=True,
                     extra_options={"MatMulConstBOnly": True})


def _int4(src: Path, dst: Path, block: int) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=True, accuracy_level=4,
                                     nodes_to_exclude=_non_float_gathers(model),
                                     op_types_to_quantize=("MatMul", "Gather"),
                                     quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)


def _non_float_gathers(model) -> list[str]:
    """Gathers whose table is not fp32 (e.g. the drafter's int64 centroid -> token table): not quantizable."""
    from onnx import TensorProto

    floats = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
    return [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] not in floats]


def weight_bytes(path: Path) -> dict[str, int]:
    """Bytes of the constant tensors a graph's matmuls and embedding lookups read (quantized data, scales, zero
    points included), and of all its constants."""
    import onnx

    from .onnx_data import stored_nbytes

    graph = onnx.load(str(path), load_external_data=False).graph  # sizes only: a real-size graph never loads
    sizes = {i.name: stored_nbytes(i) for i in graph.initializer}
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    # an fp16 weight reaches its matmul through a Cast
    cast_of = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "Cast" and n.input[0] in sizes}
    out = {"matmul": 0, "gather": 0, "total": sum(sizes.values())}
    for name, size in sizes.items():
        ops = consumers.get(name, set()) | consumers.get(cast_of.get(name, ""), set())
        if ops & set(MATMUL_OPS):
            out["matmul"] += size
        elif ops & set(GATHER_OPS):
            out["gather"] += size
    return out
