"""Assertions and tampered modules shared by several test files."""

from __future__ import annotations

import torch

from edge_mtp.export.driver import TOLERANCE


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


class Interrupt(Exception):
    """Raised by `stop_at` to simulate a run killed mid-way."""


def stop_at(stop: int):
    """A distill progress callback that kills the run when step `stop` completes."""
    def progress(step: int, total: int, loss: float, acceptance: float) -> None:
        if step == stop:
            raise Interrupt
    return progress
