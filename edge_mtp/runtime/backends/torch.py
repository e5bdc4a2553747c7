"""Reference backend: our PyTorch modules, fp32, on the CPU."""

from __future__ import annotations

import numpy as np
import torch

from ...model.contract import ACTIVATIONS, Contract
from ...model.drafter import Drafter
from ...model.loading import TargetModels, use_scales
from .base import Backend


class TorchBackend(Backend):
    """Runs Embedder / PerLayerEmbedder / Target / Drafter modules over one dict of KV tensors."""

    name = "torch"

    def __init__(self, models: TargetModels, drafter: Drafter | None, contract: Contract):
        self.models, self.drafter, self.contract = models, drafter, contract
        use_scales(contract.scales_by_kind(), models.target, drafter)
        self.kv: dict[str, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        self.kv = {s.name: torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in self.contract.kv_tensors()}

    @torch.no_grad()
    def embed(self, token: int) -> tuple[np.ndarray, np.ndarray | None]:
        ids = torch.tensor([[token]], dtype=torch.int32)
        emb = self.models.embedder(ids)["embeddings"].numpy()
        ple = self.models.per_layer_embedder
        return emb, (ple(ids)["per_layer_embeddings"].numpy() if ple is not None else None)

    @torch.no_grad()
    def run_target(self, signature: str, embeddings: np.ndarray, per_layer_embeddings: np.ndarray | None,
                   input_pos: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        out = self.models.target(torch.from_numpy(embeddings),
                                 None if per_layer_embeddings is None else torch.from_numpy(per_layer_embeddings),
                                 torch.from_numpy(input_pos), torch.from_numpy(mask), **self.kv)
        for name in self.kv:
            self.kv[name] = out[name]
        return {"logits": out["logits"].numpy(), ACTIVATIONS: out[ACTIVATIONS].numpy()}

    @torch.no_grad()
    def run_drafter(self, activations: np.ndarray, input_pos: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        assert self.drafter is not None, "this backend has no drafter"
        caches = {n: self.kv[n] for n in self.drafter.cache_names()}
        out = self.drafter(torch.from_numpy(activations), torch.from_numpy(input_pos), torch.from_numpy(mask),
                           **caches)
        return {k: v.numpy() for k, v in out.items()}
