"""Convert PyTorch modules to LiteRT (.tflite) with litert_torch, and check converted signatures against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..model.contract import INPUT_POS, Contract
from ..model.kv_quant import rounded_as
from ..util.errors import EdgeMtpError
from ..util.quiet import converter_output_quiet
from .signatures import ExportUnit, compare_outputs, run_reference, sample_inputs

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


def unit_samples(unit: ExportUnit, contract: Contract, seeds: Sequence[int] = (0, 100, 101)) -> dict:
    """Contract sample inputs for every signature of a unit (the first seed traces, the others check)."""
    return {sig.name: [sample_inputs(sig, contract, seed=seed) for seed in seeds] for sig, _ in unit.signatures}


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


def check_module(path: Path, modules: Mapping[str, torch.nn.Module], samples: Samples) -> dict[str, dict]:
    """Compare every converted signature with its PyTorch module on the checking samples; worst error per output."""
    runner = TfliteRunner(path)
    report: dict[str, dict] = {}
    for name, module in modules.items():
        worst: dict[str, dict[str, float]] = {}
        for inputs in samples[name][1:]:
            got = runner(name, inputs)
            with rounded_as(written_rows(got, inputs)):
                want = run_reference(module, inputs)
            for output, row in compare_outputs(got, want).items():
                if output not in worst or row["relative"] > worst[output]["relative"]:
                    worst[output] = row
        report[name] = worst
    return report

