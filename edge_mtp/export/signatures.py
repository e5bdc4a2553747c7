"""Adapters from our modules to contract signatures: keyword tensors in, exactly the contract's outputs out.

Both exporters trace these, and the numerical checks run them, so a signature's behaviour is defined once.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..model.contract import INPUT_POS, PARAM_TENSOR, Contract, Signature, TensorSpec, causal_mask, param_values
from ..model.kv_quant import QMAX


class SignatureModule(torch.nn.Module):
    """Calls `model` with the signature's inputs by name and returns only the signature's outputs."""

    def __init__(self, model: torch.nn.Module, signature: Signature, positional: tuple[str, ...] = ()):
        super().__init__()
        self.model = model
        self.signature_name = signature.name
        self.positional = positional
        self.output_names = tuple(o.name for o in signature.outputs)

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        args = [inputs.pop(name, None) for name in self.positional]
        out = self.model(*args, **inputs)
        return {name: out[name] for name in self.output_names}


def sample_inputs(signature: Signature, contract: Contract, seed: int = 0, start: int | None = None,
                  caches: bool = True) -> dict[str, np.ndarray]:
    """Realistic random inputs for a signature: valid token ids, positions mid-context, causal masks, random caches
    (left out with caches=False)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    length = next((s.shape[1] for s in signature.inputs if s.name == "embeddings"), 1)
    if start is None:
        start = int(rng.integers(0, contract.context - length + 1)) if signature.name != "mtp_drafter" else \
            int(rng.integers(1, contract.context))
    for spec in signature.inputs:
        if spec.name.startswith("kv_cache") and not caches:
            continue
        if spec.name == "token_ids":
            out[spec.name] = rng.integers(0, contract.target.vocab_size, spec.shape).astype(np.int32)
        elif spec.name == "input_pos":
            out[spec.name] = np.arange(start, start + spec.shape[0], dtype=np.int32)
        elif spec.name == "mask":
            out[spec.name] = causal_mask(start, spec.shape[2], contract.context)
        elif spec.name == PARAM_TENSOR:
            out[spec.name] = param_values(start, length)
        elif spec.name.startswith("kv_cache"):
            out[spec.name] = random_cache(spec, rng)
        else:
            out[spec.name] = (rng.standard_normal(spec.shape) * 2.0).astype(spec.dtype)
    return out


def random_cache(spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    """Random contents of a cache: unit normal values, or int8 values spread over the whole range."""
    if spec.dtype == "int8":
        return rng.integers(-QMAX, QMAX + 1, spec.shape).astype(np.int8)
    return rng.standard_normal(spec.shape).astype(spec.dtype)


@torch.no_grad()
def run_reference(module: SignatureModule, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The PyTorch module's outputs for numpy inputs."""
    out = module(**{k: torch.from_numpy(v.copy()) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in out.items()}


def compare_outputs(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: max abs error, the reference's max magnitude, and their ratio (what tolerances are checked on)."""
    report = {}
    for name, want in ref.items():
        got = np.asarray(ours[name], dtype=np.float64).reshape(want.shape)
        err = float(np.abs(got - want).max()) if want.size else 0.0
        scale = float(np.abs(want).max()) if want.size else 0.0
        report[name] = {"max_abs_error": err, "scale": scale, "relative": err / scale if scale else err}
    return report


def relative_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray], key: str) -> float:
    """max |got - want| / max |want| of one output."""
    scale = float(np.abs(want[key]).max()) or 1.0
    return float(np.abs(np.asarray(got[key]).reshape(want[key].shape) - want[key]).max()) / scale


def written_rows(outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray]
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The int8 K and V rows [1,Hkv,T,hd] a converted graph wrote at input_pos, per written cache in layer order
    (a layer piece's `k_cache`, or a whole target's kv_cache_k_<i>): what kv_quant.rounded_as checks. Position p
    sits in slot p mod S of a cache of S slots (a sliding layer's ring; p < S elsewhere)."""
    keys = [n for n, a in outputs.items() if a.dtype == np.int8 and (n == "k_cache" or n.startswith("kv_cache_k_"))]
    keys.sort(key=lambda n: int(n.rsplit("_", 1)[1]) if n[-1].isdigit() else 0)
    pos = np.asarray(inputs[INPUT_POS]).astype(np.int64) if keys else None
    values = {k: "v_cache" if k == "k_cache" else k.replace("_k_", "_v_") for k in keys}
    slots = {k: pos % outputs[k].shape[2] for k in keys}
    return [(outputs[k][:, :, slots[k], :], np.swapaxes(outputs[values[k]][:, :, :, slots[k]], 2, 3)) for k in keys]
