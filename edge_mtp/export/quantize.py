"""Quantization for LiteRT models (ai-edge-quantizer), applied one converted model at a time; the recipe names and
their checks are in export/options.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..formats.tflite import mapped_file, read_tflite
from ..util.errors import EdgeMtpError
from ..util.quiet import converter_output_quiet
from .options import RECIPES, check_recipe

# Why 'int4' is channelwise on LiteRT: XNNPACK (ai-edge-litert 2.3, x86 with AVX-512 VNNI, 2 threads) multiplies
# blockwise 4-bit weights fast only for one input row. python -m benchmarks.int4_layout, ms for 8 FC layers
# 1536 <-> 6144 at 1 / 4 / 32 rows: block 32 1.03 / 6.42 / 18.4, block 128 0.95 / 4.17 / 19.5, channelwise
# 1.11 / 1.21 / 2.66, int8 2.94 / 1.81 / 3.41. A verify of G+1 rows and every prefill pay that factor: it is what
# made a verify(4) of E2B int4 (block 32) cost 2.2 decodes.
INT4_LAYOUT = "CHANNELWISE"


def _weights(num_bits: int, granularity: str) -> list[dict]:
    return [{"regex": ".*", "operation": "*", "algorithm_key": "min_max_uniform_quantize",
             "op_config": {"weight_tensor_config": {"num_bits": num_bits, "symmetric": True,
                                                    "granularity": granularity, "dtype": "INT"},
                           "compute_precision": "INTEGER", "explicit_dequantize": False}}]


def _fp16() -> list[dict]:
    return [{"regex": ".*", "operation": "*", "algorithm_key": "float_casting",
             "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"}, "compute_precision": "FLOAT",
                           "explicit_dequantize": True}}]


def component_recipe(name: str) -> list[dict] | None:
    """The ai-edge-quantizer recipe of a uniform recipe name (None for fp32)."""
    check_recipe(name)
    if name == "fp32":
        return None
    if name == "fp16":
        return _fp16()
    if name == "int8":
        return _weights(8, "CHANNELWISE")
    if name == "int4":
        return _weights(4, INT4_LAYOUT)
    if name in ("int4-b32", "int4-b64", "int4-b128"):
        return _weights(4, f"BLOCKWISE_{name.split('-b')[1]}")
    raise EdgeMtpError(f"Unknown quantization recipe '{name}'; choose one of {', '.join(RECIPES)}.")


_NOT_DIVISIBLE = re.compile(r"parameters for tensor: (.+?)\. Error: Quantized dimension \d+ in tensor shape "
                            r"\(([\d, ]+)\) is not divisible by block size")


def _scopes_reading(path: Path, tensor: str, shape: tuple[int, ...]) -> list[str]:
    """Scopes (what recipe regexes match: an op's output tensor names) of the ops reading a named constant.

    Constants are often all called 'arith.constant', so the shape tells them apart; the recipe cannot name the
    weight itself, only the op that reads it.
    """
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as tfl

    model = read_tflite(path)  # tfl.read_model leaves its descriptor open: the deleted piece would keep its disk
    scopes = []
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            for index in op.inputs:
                t = subgraph.tensors[index] if index >= 0 else None
                if t is not None and tfl.get_tensor_name(t) == tensor and tuple(int(d) for d in t.shape) == shape:
                    scopes.append(tfl.get_op_scope(op, subgraph.tensors))
    return scopes


def quantize_file(path: Path, recipe: list[dict] | None, out: Path) -> Path:
    """Quantize one .tflite with a recipe (or copy it for fp32).

    Blockwise recipes need the quantized dimension divisible by the block; a tensor that is not (e.g. a PLE
    projection of width 16 under block 32) is quantized channelwise at the same bit width instead.
    """
    if recipe is None:
        out.write_bytes(path.read_bytes())
        return out
    from ai_edge_quantizer import quantizer

    recipe = list(recipe)
    for _ in range(64):
        try:
            with converter_output_quiet():  # its "Applying Transformations" bar ignores enable_progress_bar
                result = quantizer.Quantizer(mapped_file(path), recipe).quantize(enable_progress_bar=False,
                                                                         enable_progress_report=False)
            break
        except Exception as e:
            match = _NOT_DIVISIBLE.search(str(e))
            if not match:
                raise EdgeMtpError(f"ai-edge-quantizer failed on {path.name}: {e}") from None
            shape = tuple(int(d) for d in match.group(2).split(","))
            scopes = _scopes_reading(path, match.group(1), shape) or [match.group(1)]
            for scope in scopes:
                channelwise = json.loads(json.dumps(recipe[0]))
                channelwise["regex"] = "^" + re.escape(scope) + "$"
                channelwise["op_config"]["weight_tensor_config"]["granularity"] = "CHANNELWISE"
                if channelwise not in recipe:
                    recipe.append(channelwise)
                elif len(scopes) == 1:
                    raise EdgeMtpError(f"ai-edge-quantizer could not quantize {path.name}: {match.group(0)}.")
    else:
        raise EdgeMtpError(f"ai-edge-quantizer could not quantize {path.name} with this recipe.")
    out.write_bytes(result.quantized_model)
    return out
