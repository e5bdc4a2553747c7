"""Convert PyTorch modules to LiteRT (.tflite) with litert_torch, and run converted signatures."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..util.errors import EdgeMtpError
from ..util.quiet import converter_output_quiet

Samples = Mapping[str, Sequence[Mapping[str, np.ndarray]]]  # signature -> inputs per seed


def convert_module(modules: Mapping[str, torch.nn.Module], samples: Samples, path: Path) -> Path:
    """Trace each signature's module on its first sample and write one multi-signature .tflite at `path`."""
    try:
        import litert_torch
    except ImportError:
        raise EdgeMtpError("LiteRT export needs litert-torch: pip install 'edge-mtp[litert]'.") from None
    converted = None
    with converter_output_quiet(), torch.no_grad():
        for name, module in modules.items():
            sample = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in samples[name][0].items()}
            module.eval()
            if converted is None:
                converted = litert_torch.signature(name, module, sample_kwargs=sample)
            else:
                converted = converted.signature(name, module, sample_kwargs=sample)
        converted.convert().export(str(path))
    return path


class TfliteRunner:
    """Runs signatures of one .tflite with a single LiteRT interpreter (made once: it packs the weights)."""

    def __init__(self, path: Path):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path))
        self.runners: dict[str, object] = {}

    def __call__(self, signature: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if signature not in self.runners:
            self.runners[signature] = self.interpreter.get_signature_runner(signature)
        return self.runners[signature](**inputs)
