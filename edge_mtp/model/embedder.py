"""Token -> embedding models that run outside the target graph (LiteRT-LM's embedder path, required by MTP)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..checkpoint.spec import TargetSpec
from .layers import embed_scale


def _storage_dtype(spec: TargetSpec) -> torch.dtype:
    return getattr(torch, spec.dtype, torch.bfloat16)


class Embedder(nn.Module):
    """token_ids int32 [1,T] -> embeddings [1,T,H] = E[ids] * sqrt(H) (scale rounded to the checkpoint dtype)."""

    def __init__(self, spec: TargetSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.scale = embed_scale(spec.hidden_size, _storage_dtype(spec))

    def forward(self, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embeddings": self.embed_tokens(token_ids.long()).float() * self.scale}


class PerLayerEmbedder(nn.Module):
    """token_ids int32 [1,T] -> per_layer_embeddings [1,T,NL,P] = E_ple[ids] * sqrt(P), the token part of PLE."""

    def __init__(self, spec: TargetSpec):
        super().__init__()
        self.spec = spec
        self.embed_tokens_per_layer = nn.Embedding(spec.ple_vocab_size, spec.num_layers * spec.ple_dim)
        self.scale = embed_scale(spec.ple_dim, _storage_dtype(spec))

    def forward(self, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = self.embed_tokens_per_layer(token_ids.long()).float() * self.scale
        return {"per_layer_embeddings": rows.reshape(*token_ids.shape, self.spec.num_layers, self.spec.ple_dim)}
