"""The Gemma 4 target in the on-device contract: embeddings in, logits + activations + updated caches out."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..contract import k_name, v_name
from ..spec import FULL, SLIDING, TargetSpec
from .layers import DecoderLayer, KeyView, RMSNorm, rope_cos_sin, rope_inv_freq, write_cache


class Target(nn.Module):
    """One forward for prefill (T tokens), decode (T=1) and verify (T=G+1).

    Inputs: `embeddings` [1,T,H] (scaled token embeddings, from the Embedder), `per_layer_embeddings` [1,T,NL,P]
    (the token part of PLE, from the PerLayerEmbedder), `input_pos` int32 [T], `mask` [1,1,T,C] additive (causal
    only: sliding windows are applied here), and `kv_cache_k_<i>` [1,Hkv,C,hd] / `kv_cache_v_<i>` [1,Hkv,hd,C] for
    every cache-owning layer i (`contiguous=False` when input_pos is not one run of consecutive positions, as in
    batched training). Returns a dict with `logits` [1,T,V] (softcapped), `activations` [1,T,H] (the
    post-final-norm hidden state) and every cache with the new rows written at `input_pos`.
    """

    def __init__(self, spec: TargetSpec):
        super().__init__()
        self.spec = spec
        self.cache_write = "scatter"  # the LiteRT exporter switches this to "dus" (see layers.write_cache)
        h = spec.hidden_size
        self.embed_tokens = nn.Embedding(spec.vocab_size, h)  # the tied output head
        if spec.ple_dim:
            self.per_layer_model_projection = nn.Linear(h, spec.num_layers * spec.ple_dim, bias=False)
            self.per_layer_projection_norm = RMSNorm(spec.ple_dim, spec.rms_eps)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, i, i < spec.first_shared_layer, spec.layer_intermediate_size(i), spec.ple_dim)
            for i in range(spec.num_layers))
        self.norm = RMSNorm(h, spec.rms_eps)
        for kind in (SLIDING, FULL):
            self.register_buffer(f"inv_freq_{kind}", rope_inv_freq(spec, kind), persistent=False)

    def per_layer_inputs(self, embeddings: torch.Tensor, per_layer_embeddings: torch.Tensor) -> torch.Tensor:
        """PLE: (rmsnorm(proj(x0) / sqrt(H)) + token part) / sqrt(2), shape [1,T,NL,P]."""
        s = self.spec
        ctx = self.per_layer_model_projection(embeddings) * (s.hidden_size ** -0.5)
        ctx = self.per_layer_projection_norm(ctx.reshape(*embeddings.shape[:2], s.num_layers, s.ple_dim))
        return (ctx + per_layer_embeddings) * (2.0 ** -0.5)

    def forward(self, embeddings: torch.Tensor, per_layer_embeddings: torch.Tensor | None, input_pos: torch.Tensor,
                mask: torch.Tensor, contiguous: bool = True, **kv_caches: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.spec
        rope = {kind: rope_cos_sin(input_pos, getattr(self, f"inv_freq_{kind}")) for kind in (SLIDING, FULL)}
        views = {FULL: KeyView(mask), SLIDING: KeyView.sliding(input_pos, mask, s.sliding_window, contiguous)}
        ple = self.per_layer_inputs(embeddings, per_layer_embeddings) if s.ple_dim else None
        caches = dict(kv_caches)
        h = embeddings
        for i, layer in enumerate(self.layers):
            kind = s.layer_types[i]
            cos, sin = rope[kind]
            src = s.kv_source(i)
            attn = layer.self_attn

            def attention(x: torch.Tensor, i=i, attn=attn, cos=cos, sin=sin, src=src, kind=kind) -> torch.Tensor:
                if attn.own_kv:
                    k, v = attn.key_value(x, cos, sin)
                    caches[k_name(i)], caches[v_name(i)] = write_cache(
                        caches[k_name(i)], caches[v_name(i)], k, v, input_pos, self.cache_write)
                q = attn.query(x, cos, sin)
                return attn.o_proj(views[kind].attend(q, caches[k_name(src)], caches[v_name(src)]))

            h = layer(h, attention, ple[:, :, i] if ple is not None else None)
        activations = self.norm(h)
        logits = torch.matmul(activations, self.embed_tokens.weight.t())
        if s.final_softcap:
            logits = torch.tanh(logits / s.final_softcap) * s.final_softcap
        return {"logits": logits, "activations": activations, **{n: caches[n] for n in kv_caches}}
