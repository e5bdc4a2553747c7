"""Assertions and tampered modules shared by several test files."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from edge_mtp.export.driver import TOLERANCE
from edge_mtp.export.signatures import SignatureModule
from edge_mtp.model.contract import DRAFTER, EMBEDDER, PER_LAYER_EMBEDDER, TARGET, Contract, Signature
from edge_mtp.model.drafter import Drafter
from edge_mtp.model.loading import TargetModels


def assert_export_checks(summary, pieces: set[str]) -> None:
    """Every converted piece (LiteRT) or model (ONNX) matched PyTorch within the export tolerance."""
    assert set(summary.checks) == pieces
    assert all(0 <= error <= TOLERANCE for error in summary.checks.values()), summary.checks


def assert_streamed_export(summary, layers: int = 6) -> None:
    """A LiteRT fp32 export: every piece checked, and the whole bundle equal to the streamed PyTorch reference to
    float rounding, for the target and the drafter."""
    assert_export_checks(summary, {"embedder", "per_layer_embedder", "prelude", "head", "drafter"} |
                         {f"layer_{i}" for i in range(layers)})
    report = summary.quantization
    assert report["reference"] == "streamed PyTorch fp32"
    assert report["logit_relative_error"] <= 1e-4 and report["top1_agreement"] == 1.0
    assert report["drafter_logit_relative_error"] <= 1e-4 and report["drafter_top1_agreement"] == 1.0


@dataclass
class ExportUnit:
    """One model of the bundle: its name, the module and the signatures to trace on it."""

    name: str
    signatures: list[tuple[Signature, SignatureModule]]


def export_units(models: TargetModels, drafter: Drafter | None, contract: Contract) -> list[ExportUnit]:
    """The whole bundle's signature modules at once (the exporters build them piece by piece): embedder,
    per-layer embedder, target, drafter."""
    units = [ExportUnit(EMBEDDER, [(contract.embedder(), SignatureModule(models.embedder, contract.embedder()))])]
    if models.per_layer_embedder is not None:
        sig = contract.per_layer_embedder()
        units.append(ExportUnit(PER_LAYER_EMBEDDER, [(sig, SignatureModule(models.per_layer_embedder, sig))]))
    target_args = ("embeddings", "per_layer_embeddings", "input_pos", "mask")
    units.append(ExportUnit(TARGET, [(sig, SignatureModule(models.target, sig, target_args))
                                     for sig in contract.target_signatures()]))
    if drafter is not None:
        sig = contract.drafter_signature()
        units.append(ExportUnit(DRAFTER, [(sig, SignatureModule(drafter, sig, ("activations", "input_pos", "mask")))]))
    return units


def assert_verify_rows_are_decodes(backend, positions, prompts: list[list[int]], max_tokens: int) -> None:
    """Each row of a verify gives the bits of a decode of its token from the same cache, at every position given,
    and greedy MTP emits exactly the plain tokens for every prompt."""
    from edge_mtp.model.contract import DECODE, LOGITS, VERIFY
    from edge_mtp.runtime.speculative import SpeculativeDecoder, generate_tokens

    decoder, rng, vocab = SpeculativeDecoder(backend), np.random.default_rng(0), backend.contract.target.vocab_size
    for position in positions:
        backend.reset()
        decoder.prefill([int(t) for t in rng.integers(3, vocab, position)])
        cache = {name: backend.read_kv(name) for name in backend.kv}
        rows = [int(t) for t in rng.integers(3, vocab, backend.contract.verify_len)]
        verified = decoder.step(VERIFY, rows, position)[LOGITS][0]
        for name, value in cache.items():
            backend.kv[name].write(value)
        for i, token in enumerate(rows):  # bit for bit, though int activations round every row
            assert np.array_equal(decoder.step(DECODE, [token], position + i)[LOGITS][0, 0], verified[i]), (position, i)
    for prompt in prompts:
        mtp, stats = generate_tokens(backend, prompt, max_tokens=max_tokens, mtp=True)
        assert stats.verifies > 0 and mtp == generate_tokens(backend, prompt, max_tokens=max_tokens, mtp=False)[0]


def _shift(t: torch.Tensor, axis: int) -> torch.Tensor:
    """The cache moved one slot along the sequence axis."""
    return torch.cat([t.narrow(axis, t.shape[axis] - 1, 1), t.narrow(axis, 0, t.shape[axis] - 1)], dim=axis)


class ShiftedCaches(torch.nn.Module):
    """A drafter wired one slot off: it reads the right buffers at the wrong positions (a shared-KV wiring bug)."""

    def __init__(self, drafter):
        super().__init__()
        self.drafter, self.spec = drafter, drafter.spec

    def forward(self, activations, input_pos, mask, **caches):
        shifted = {n: _shift(t, 2 if "_k_" in n else 3) for n, t in caches.items()}
        return self.drafter(activations, input_pos, mask, **shifted)


# a logging record (Python's default and onnxruntime's formats) or an absl / glog line
LIBRARY_RECORD = re.compile(r"\[(DEBUG|INFO|WARNING|ERROR)\]|^(DEBUG|INFO|WARNING|ERROR)[: ]|^[IWEF]\d{4} ")
STAGE = re.compile(r"^(\[\d\d:\d\d:\d\d\] | {11})[a-z]")  # a progress line: [hh:mm:ss] stage (the time once a second)
MAX_PROGRESS_LINES = 20


def assert_only_progress(stderr: str) -> None:
    """A command's stderr holds its stage lines and edge-mtp's own notices, a bounded number of them, and not one
    library log record."""
    lines = stderr.splitlines()
    assert not [ln for ln in lines if LIBRARY_RECORD.search(ln)], stderr[-3000:]
    assert all(STAGE.match(ln) or ln.startswith("edge-mtp: ") for ln in lines), stderr[-3000:]
    assert 0 < len(lines) <= MAX_PROGRESS_LINES, stderr[-3000:]


class Interrupt(Exception):
    """Raised by `stop_at` to simulate a run killed mid-way."""


def stop_at(stop: int):
    """A distill progress callback that kills the run when step `stop` completes."""
    def progress(step: int, total: int, loss: float, acceptance: float) -> None:
        if step == stop:
            raise Interrupt
    return progress
