"""Assertions and tampered modules shared by several test files."""

from __future__ import annotations

import torch

from edge_mtp.export.pipeline import TOLERANCE


def assert_export_checks(summary) -> None:
    """Every signature of every exported model matched PyTorch within the export tolerance."""
    assert set(summary.checks) == {"embedder", "per_layer_embedder", "target", "drafter"}
    assert set(summary.checks["target"]) == {"prefill_8", "prefill_16", "decode", "verify"}
    for model, signatures in summary.checks.items():
        for signature, outputs in signatures.items():
            for name, row in outputs.items():
                assert row["relative"] <= TOLERANCE, (model, signature, name, row)
    assert {"logits", "activations", "kv_cache_k_0", "kv_cache_v_2"} <= set(summary.checks["target"]["verify"])
    assert {"logits", "projected_activations"} == set(summary.checks["drafter"]["mtp_drafter"])


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
