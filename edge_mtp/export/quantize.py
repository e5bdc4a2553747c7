"""Quantization recipes for LiteRT models (ai-edge-quantizer), applied one converted model at a time.

Recipe names (shared with the ONNX exporter where they mean the same thing):
  fp32        no quantization
  fp16        fp16 weights, fp32 compute
  int8        channelwise int8 weights, dynamic int8 activations
  int4        blockwise 4-bit weights (block 32), dynamic int8 activations; int4-b32 / int4-b64 / int4-b128 pick the block
  mixed       4-bit (block 32) for the embedding tables and the target, 8-bit for the drafter and for any component
              whose 4-bit error, measured on random inputs, exceeds MIXED_SENSITIVITY
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import EdgeMtpError

RECIPES = ("fp32", "fp16", "int8", "int4", "int4-b32", "int4-b64", "int4-b128", "mixed")
DEFAULT_RECIPE = "fp32"
MIXED_SENSITIVITY = 0.05  # relative output error above which 'mixed' keeps a component at 8 bits


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
    if name == "fp32":
        return None
    if name == "fp16":
        return _fp16()
    if name == "int8":
        return _weights(8, "CHANNELWISE")
    if name in ("int4", "int4-b32", "int4-b64", "int4-b128"):
        block = name.split("-b")[1] if "-b" in name else "32"
        return _weights(4, f"BLOCKWISE_{block}")
    raise EdgeMtpError(f"Unknown quantization recipe '{name}'; choose one of {', '.join(RECIPES)}.")


def check_recipe(name: str) -> None:
    """Refuse an unknown recipe before any conversion work."""
    if name not in RECIPES:
        raise EdgeMtpError(f"Unknown quantization recipe '{name}'; choose one of {', '.join(RECIPES)}.")


_NOT_DIVISIBLE = re.compile(r"parameters for tensor: (.+?)\. Error: Quantized dimension \d+ in tensor shape .* "
                            r"is not divisible by block size")


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
            result = quantizer.Quantizer(str(path), recipe).quantize(enable_progress_report=False)
            break
        except Exception as e:
            match = _NOT_DIVISIBLE.search(str(e))
            if not match:
                raise EdgeMtpError(f"ai-edge-quantizer failed on {path.name}: {e}") from None
            channelwise = json.loads(json.dumps(recipe[0]))
            channelwise["regex"] = re.escape(match.group(1))
            channelwise["op_config"]["weight_tensor_config"]["granularity"] = "CHANNELWISE"
            recipe.append(channelwise)
    else:
        raise EdgeMtpError(f"ai-edge-quantizer could not quantize {path.name} with this recipe.")
    out.write_bytes(result.quantized_model)
    return out


def quantize_models(paths: dict[str, Path], recipe_name: str, workdir: Path,
                    sensitivity: Callable[[str, Path], float] | None = None) -> tuple[dict[str, Path], dict[str, str]]:
    """Quantize every model file; returns the new paths and the recipe each component actually got."""
    check_recipe(recipe_name)
    chosen: dict[str, str] = {}
    out: dict[str, Path] = {}
    for name, path in paths.items():
        if recipe_name != "mixed":
            chosen[name] = recipe_name
        elif name == "drafter":
            chosen[name] = "int8"  # a quantized drafter loses acceptance first; keep it at 8 bits
        else:
            trial = quantize_file(path, component_recipe("int4"), workdir / f"{name}.trial.tflite")
            error = sensitivity(name, trial) if sensitivity else 0.0
            chosen[name] = "int4" if error <= MIXED_SENSITIVITY else "int8"
            trial.unlink()
        out[name] = quantize_file(path, component_recipe(chosen[name]), workdir / f"{name}.{chosen[name]}.tflite")
    return out, chosen


def relative_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray], key: str) -> float:
    """max |got - want| / max |want| of one output."""
    scale = float(np.abs(want[key]).max()) or 1.0
    return float(np.abs(np.asarray(got[key]).reshape(want[key].shape) - want[key]).max()) / scale
