"""Convert the bundle's models to LiteRT (.tflite) with litert_torch, one model at a time, and check each signature."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import torch

from ..contract import Contract
from ..errors import EdgeMtpError
from .signatures import ExportUnit, compare_outputs, run_reference, sample_inputs


@contextlib.contextmanager
def _quiet():
    """litert_torch prints a progress tree and absl logs for every stage; keep the user's terminal readable."""
    previous = logging.root.level
    logging.root.setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            yield
        finally:
            logging.root.setLevel(previous)


def convert_unit(unit: ExportUnit, contract: Contract, path: Path) -> Path:
    """Trace every signature of one model and write a single multi-signature .tflite at `path`."""
    try:
        import litert_torch
    except ImportError:
        raise EdgeMtpError("LiteRT export needs litert-torch: pip install 'edge-mtp[litert]'.") from None
    converted = None
    with _quiet(), torch.no_grad():
        for signature, module in unit.signatures:
            sample = {k: torch.from_numpy(v) for k, v in sample_inputs(signature, contract).items()}
            module.eval()
            if converted is None:
                converted = litert_torch.signature(signature.name, module, sample_kwargs=sample)
            else:
                converted = converted.signature(signature.name, module, sample_kwargs=sample)
        model = converted.convert()
        model.export(str(path))
    return path


def run_tflite(path: Path, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run one signature of a .tflite with the LiteRT interpreter."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner(signature)
    return runner(**inputs)


def check_unit(unit: ExportUnit, contract: Contract, path: Path, seeds: int = 2) -> dict[str, dict]:
    """Compare every converted signature with its PyTorch module on random inputs; worst error per output."""
    report: dict[str, dict] = {}
    for signature, module in unit.signatures:
        worst: dict[str, dict[str, float]] = {}
        for seed in range(seeds):
            inputs = sample_inputs(signature, contract, seed=100 + seed)
            got = run_tflite(path, signature.name, inputs)
            for name, row in compare_outputs(got, run_reference(module, inputs)).items():
                if name not in worst or row["relative"] > worst[name]["relative"]:
                    worst[name] = row
        report[signature.name] = worst
    return report
