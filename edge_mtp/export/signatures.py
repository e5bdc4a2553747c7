"""Adapters from our modules to contract signatures: keyword tensors in, exactly the contract's outputs out.

Both exporters trace these, and the numerical checks run them, so a signature's behaviour is defined once.
"""

from __future__ import annotations

import numpy as np
import torch

from ..model.contract import PARAM_TENSOR, Contract, Signature, causal_mask, param_values


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
        else:
            scale = 1.0 if spec.name.startswith("kv_cache") else 2.0
            out[spec.name] = (rng.standard_normal(spec.shape) * scale).astype(spec.dtype)
    return out


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
