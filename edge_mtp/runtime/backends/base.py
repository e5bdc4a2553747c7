"""What a runtime backend provides: named signatures run over one KV state that target and drafter share.

Backends know nothing about speculation; `runtime.speculative` drives them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ...model.contract import Contract


class Backend(ABC):
    """Runs the bundle's models; owns the KV state, which `run_target` updates in place and `run_drafter` reads.

    The loop passes the same input arrays on every call, rewritten in place: a backend copies what it needs during
    the call and keeps no reference to them; the arrays it returns are its own, fresh for each call.
    """

    contract: Contract
    name: str = "backend"

    @abstractmethod
    def embed(self, token: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Embedder outputs for one token: embeddings [1,1,H] and per_layer_embeddings [1,1,NL,P] (or None)."""

    @abstractmethod
    def run_target(self, signature: str, embeddings: np.ndarray, per_layer_embeddings: np.ndarray | None,
                   input_pos: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """Run a target signature; returns logits/activations (decode, verify) and writes the KV rows in place."""

    @abstractmethod
    def run_drafter(self, activations: np.ndarray, input_pos: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """One draft step: logits [1,1,V] and projected_activations [1,1,H]."""

    @abstractmethod
    def reset(self) -> None:
        """Zero the KV state before a new sequence."""

    @property
    def has_drafter(self) -> bool:
        return self.contract.drafter is not None
