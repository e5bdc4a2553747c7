"""The Gemma 4 target in the on-device contract: embeddings in, logits + activations + updated caches out."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..checkpoint.spec import FULL, SLIDING, TargetSpec
from .contract import INPUT_POS, MASK, PARAM_TENSOR, k_name, v_name
from .kv_quant import KvScales
from .kv_update import read_cache, write_rows
from .layers import DecoderLayer, KeyView, RMSNorm, graph_output, ring_sources, rope_cos_sin, rope_inv_freq, write_ring

RING_SOURCES = "ring_sources"  # layer-context entry: where each ring slot's row comes from (layers.ring_sources)


def ple_name(layer: int) -> str:
    """Name of layer `layer`'s per-layer input row in the layer context."""
    return f"ple_{layer}"


class Target(nn.Module):
    """One forward for prefill (T tokens), decode (T=1) and verify (T=G+1).

    Inputs: `embeddings` [1,T,H] (scaled token embeddings, from the Embedder), `per_layer_embeddings` [1,T,NL,P]
    (the token part of PLE, from the PerLayerEmbedder), `input_pos` int32 [T], `mask` [1,1,T,C] additive (causal
    only: sliding windows are applied here), and `kv_cache_k_<i>` [1,Hkv,C,hd] / `kv_cache_v_<i>` [1,Hkv,hd,C] for
    every cache-owning layer i (`contiguous=False` when input_pos is not one run of consecutive positions, as in
    batched training). A sliding layer's cache may instead be a ring of S < C slots (Contract.ring_size; position p
    in slot p mod S), which the forward tells from the caches' shapes. Returns a dict with `logits` [1,T,V]
    (softcapped), `activations` [1,T,H] (the post-final-norm hidden state) and every cache with the new rows written
    at `input_pos`.

    The forward is three steps that the streamed exporter also converts one by one: `layer_context` (RoPE tables,
    key views and PLE rows, computed once for all layers), `layer` (one decoder layer), `head`.
    """

    def __init__(self, spec: TargetSpec):
        super().__init__()
        self.spec = spec
        self.cache_write = "scatter"  # the LiteRT exporter switches this to "dus" (see layers.write_cache)
        self.ring = 0  # sliding ring size layer_context assumes when not told (set by the exporter of a ring contract)
        self.kv_scales: dict[str, KvScales] = {}  # per attention type, for int8 caches (model/kv_quant.py)
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

    def layer_context(self, embeddings: torch.Tensor, per_layer_embeddings: torch.Tensor | None,
                      input_pos: torch.Tensor, mask: torch.Tensor, contiguous: bool = True,
                      in_place: bool = False, ring: int | None = None) -> dict[str, torch.Tensor]:
        """Everything a layer reads besides the hidden state and the caches, by name.

        `rope_{cos,sin}_<kind>` [T, hd], `mask_<kind>` (the key view's mask) and, for a gathered sliding view,
        `index_sliding`, for a ring of `ring` slots (default self.ring) `ring_sources`; `ple_<i>` [1,T,P] per layer;
        `input_pos` and `mask` as given. `in_place` (a LiteRT target taking param_tensor) keeps the sliding view
        whole: a cache written in place is read whole or not at all.
        """
        s = self.spec
        ring = self.ring if ring is None else ring
        out = {INPUT_POS: input_pos, MASK: mask}
        rows = input_pos.shape[0]
        if ring:
            start = input_pos[:1]
            sliding = KeyView.ring(input_pos, start + (rows - 1), mask, s.sliding_window, ring)
            out[RING_SOURCES] = ring_sources(start, rows, ring)
        else:
            sliding = KeyView.sliding(input_pos, mask, s.sliding_window, contiguous and not in_place)
        for kind in sorted(set(s.layer_types)):
            out[f"rope_cos_{kind}"], out[f"rope_sin_{kind}"] = rope_cos_sin(input_pos, getattr(self, f"inv_freq_{kind}"))
            if kind == SLIDING:
                out[f"mask_{kind}"] = sliding.mask
                if sliding.index is not None:
                    out[f"index_{kind}"] = sliding.index
        if s.ple_dim:
            ple = self.per_layer_inputs(embeddings, per_layer_embeddings)
            for i in range(s.num_layers):
                out[ple_name(i)] = ple[:, :, i]
        return out

    def layer_inputs(self, i: int) -> list[str]:
        """Names of the context entries and caches layer i reads (besides the hidden state `h`)."""
        s = self.spec
        kind, src = s.layer_types[i], s.kv_source(i)
        names = [f"rope_cos_{kind}", f"rope_sin_{kind}", MASK if kind == FULL else f"mask_{kind}"]
        if kind == SLIDING:
            names.append(f"index_{kind}")
            if i == src:
                names.append(RING_SOURCES)
        if s.ple_dim:
            names.append(ple_name(i))
        names.append(PARAM_TENSOR)  # only where the signature has one
        if i == src:
            names.append(INPUT_POS)
        return names + [k_name(src), v_name(src)]

    def layer(self, i: int, h: torch.Tensor, context: dict[str, torch.Tensor],
              caches: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decoder layer i on hidden state h; a cache-owning layer writes its new K/V rows into `caches`."""
        s = self.spec
        kind, src = s.layer_types[i], s.kv_source(i)
        cos, sin = context[f"rope_cos_{kind}"], context[f"rope_sin_{kind}"]
        view = KeyView(context[MASK]) if kind == FULL else KeyView(context[f"mask_{kind}"], context.get(f"index_{kind}"))
        attn = self.layers[i].self_attn
        scales = self.kv_scales.get(kind)

        def attention(x: torch.Tensor) -> torch.Tensor:
            if attn.own_kv:
                k, v = attn.key_value(x, cos, sin)
                if kind == SLIDING and RING_SOURCES in context:
                    caches[k_name(i)], caches[v_name(i)] = write_ring(caches[k_name(i)], caches[v_name(i)], k, v,
                                                                      context[RING_SOURCES], scales)
                else:
                    caches[k_name(i)], caches[v_name(i)] = write_rows(
                        caches[k_name(i)], caches[v_name(i)], k, v, context[INPUT_POS], self.cache_write,
                        context.get(PARAM_TENSOR), scales)
            q = attn.query(x, cos, sin)
            return attn.o_proj(read_cache(view, q, caches[k_name(src)], caches[v_name(src)], context.get(PARAM_TENSOR),
                                          scales))

        return self.layers[i](h, attention, context.get(ple_name(i)))

    def head(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Final norm and the tied, softcapped LM head: `logits` [1,T,V] and `activations` [1,T,H]."""
        activations = self.norm(h)
        logits = torch.matmul(activations, self.embed_tokens.weight.t())
        if self.spec.final_softcap:
            logits = torch.tanh(logits / self.spec.final_softcap) * self.spec.final_softcap
        return {"logits": logits, "activations": graph_output(activations)}

    def forward(self, embeddings: torch.Tensor, per_layer_embeddings: torch.Tensor | None, input_pos: torch.Tensor,
                mask: torch.Tensor, contiguous: bool = True, param_tensor: torch.Tensor | None = None,
                **kv_caches: torch.Tensor) -> dict[str, torch.Tensor]:
        context = self.layer_context(embeddings, per_layer_embeddings, input_pos, mask, contiguous,
                                     param_tensor is not None, ring_of(self.spec.store_layers, mask, kv_caches))
        if param_tensor is not None:  # LiteRT's in-place cache write (model/kv_update.py)
            context[PARAM_TENSOR] = param_tensor
        caches = dict(kv_caches)
        h = embeddings
        for i in range(self.spec.num_layers):
            h = self.layer(i, h, context, caches)
        return {**self.head(h), **{n: caches[n] for n in kv_caches}}


def ring_of(store_layers: dict[str, int], mask: torch.Tensor, caches: dict[str, torch.Tensor]) -> int:
    """The ring size of the sliding caches among `caches` (0: they span the mask's context), from the shape of the
    sliding store layer's K cache."""
    layer = store_layers.get(SLIDING)
    if layer is None or k_name(layer) not in caches:
        return 0
    size = caches[k_name(layer)].shape[2]
    return size if size < mask.shape[-1] else 0
