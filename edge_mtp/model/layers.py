"""Gemma 4 building blocks on a static, explicit KV cache (gemma4.md §2).

Everything here is export-friendly: static shapes, no host syncs, cache rows written with `scatter` at `input_pos`,
grouped-query attention as a plain 4-D matmul (no repeat_kv, which the LiteRT converter miscompiles).

Everything here is also GPU-delegable once converted to LiteRT (the rules LiteRT's GPU delegate enforces,
docs/gpu.md): tensors of rank <= 4 only, no BROADCAST_TO (masks are concatenated, not repeated),
no GATHER_ND / SCATTER (row selection is `take`, which becomes LiteRT's GATHER with int32 indices).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint.spec import FULL, AttentionGeometry
from .contract import MASK_HIDDEN
from .kv_quant import KvScales, dequantize_caches, is_quantized, quantize_rows


def stored_scale(value: float, dtype: torch.dtype) -> float:
    """A scale factor rounded the way transformers rounds it: cast to the checkpoint's weight dtype first."""
    return float(torch.tensor(value, dtype=torch.float32, device="cpu").to(dtype).float())


class RMSNorm(nn.Module):
    """x * (mean(x^2) + eps)^-1/2 * w, computed in fp32 (the scale is w itself; with_scale=False has none)."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if tracing_for_litert():  # pow(v, -0.5) would be POW for one row, RSQRT for several: two roundings
            out = x32 * torch.rsqrt(row_mean_of_squares(x32) + self.eps)
        else:  # as transformers computes it
            out = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            out = out * self.weight.float()
        return out.to(x.dtype)


def row_mean_of_squares(x: torch.Tensor) -> torch.Tensor:
    """mean(x^2) over the last axis, keepdim, as LiteRT graphs compute it: the mean of the two half-row means.

    Converted to LiteRT, a MEAN whose output is one value (a decode's hidden-state norm, a lone KV head's norm) sums
    in another order than the same row among several (XNNPACK, measured at widths 128 to 1536), so a decode's norms
    would not give the bits of the same row in a verify. Halves make every first MEAN at least two rows, and the
    second sums two values, which any order rounds alike. (A per-row BATCH_MATMUL is exact too, and made verify(4)
    of the demo pair 10% slower.) An odd width keeps the one MEAN.
    """
    squares = x.pow(2)
    width = x.shape[-1]
    if width % 2:
        return squares.mean(-1, keepdim=True)
    halves = squares.reshape(1, -1, 2, width // 2).mean(-1)  # rank 4: the GPU delegate's limit
    return halves.mean(-1).reshape(*x.shape[:-1], 1)


def rope_inv_freq(spec: AttentionGeometry, layer_type: str) -> torch.Tensor:
    """Inverse frequencies [hd/2]: default RoPE for sliding layers, 'proportional' partial RoPE for full layers."""
    if layer_type == FULL:
        hd, theta = spec.global_head_dim, spec.rope_theta_full
        rotated = int(spec.partial_rotary_full * hd // 2)
    else:
        hd, theta = spec.head_dim, spec.rope_theta_sliding
        rotated = hd // 2
    inv = 1.0 / (theta ** (torch.arange(0, 2 * rotated, 2, dtype=torch.float32, device="cpu") / hd))
    return torch.cat([inv, torch.zeros(hd // 2 - rotated, device="cpu")])


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, hd] for integer positions [T] (rotate-half pairing: dim i with dim i + hd/2)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [1, heads, T, hd] by cos/sin [T, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def tracing_for_litert() -> bool:
    """True while torch.export traces a module for LiteRT (any export that is not ONNX's)."""
    return torch.compiler.is_exporting() and not torch.onnx.is_in_onnx_export()


def take(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """x.index_select(dim, index) for a 1-D int32 index; traced for LiteRT it is LiteRT's GATHER op.

    (torch's index_select converts to GATHER_ND, which LiteRT's GPU delegate rejects; GATHER along any axis with
    1-D int32 indices it accepts. Both copy values, so the numerics are the same.)
    """
    if tracing_for_litert():
        import litert_torch.backend.experimental.torch_tfl  # noqa: F401  (registers torch.ops.tfl)

        return torch.ops.tfl.gather(x, index, dim)
    return x.index_select(dim, index)


def graph_output(x: torch.Tensor) -> torch.Tensor:
    """x again, as a tensor of its own (-(-x), exact) for a graph output that ops inside the graph also read.

    LiteRT's GPU accelerator (ai-edge-litert 2.3, LiteRT-LM 0.18.1) gives such an output a host-memory buffer and
    never writes it: the target's `activations`, which also feeds the LM head, read back as garbage on the GPU.
    """
    return -(-x)


def sliding_window_mask(query_pos: torch.Tensor, window: int, context: int) -> torch.Tensor:
    """[T, C] additive mask hiding keys at or before query_pos - window (window keys, the query's own included)."""
    keys = torch.arange(context, dtype=torch.int32)
    visible = keys[None, :] > (query_pos[:, None] - window)
    return torch.where(visible, 0.0, MASK_HIDDEN)


# Row counts are rounded up to a multiple of this for a sliding view's length, so a decode and any verify of up to
# VIEW_ROWS rows gather views of one length (see KeyView.sliding).
VIEW_ROWS = 8


class KeyView:
    """The cache slots a layer type attends to, with its additive mask.

    Full layers see all C slots. Sliding layers of contiguous query rows see only the slots that any of their windows
    can reach (W - 1 plus the row count rounded up to VIEW_ROWS), gathered from the cache, so a decode step costs the
    same at context 4096 as at 256.
    """

    def __init__(self, mask: torch.Tensor, index: torch.Tensor | None = None):
        self.mask, self.index = mask, index

    @classmethod
    def sliding(cls, query_pos: torch.Tensor, mask: torch.Tensor, window: int, contiguous: bool = True) -> "KeyView":
        """View for sliding layers; query_pos [T] must be consecutive when `contiguous`."""
        context, rows = mask.shape[-1], query_pos.shape[0]
        span = window - 1 + (rows + VIEW_ROWS - 1) // VIEW_ROWS * VIEW_ROWS  # no negative floor: ONNX truncates
        if not contiguous or span >= context:
            return cls(torch.minimum(mask, sliding_window_mask(query_pos, window, context)))
        # from the first row's position: LiteRT-LM gives the padding rows of a prefill chunk positions of its own
        start = (query_pos[:1] + 1 - window).clamp(0, context - span)
        # Slot s sits in column s mod span, wherever the view starts: a verify row then sees the very score and value
        # vectors a decode at its position sees (the same columns visible, the same ones masked), and softmax and
        # the value product, whose kernels sum in an order that depends on the column, give the same bits.
        offsets = torch.arange(span, dtype=torch.int32)  # int32 throughout: the GPU has no int64
        index = start + torch.remainder(offsets - start, span)
        visible = index[None, :] > (query_pos[:, None] - window)
        window_mask = torch.where(visible, 0.0, MASK_HIDDEN)
        return cls(torch.minimum(take(mask, 3, index), window_mask), index)

    @classmethod
    def ring(cls, query_pos: torch.Tensor, last: torch.Tensor, mask: torch.Tensor, window: int, size: int) -> "KeyView":
        """View for a sliding layer's ring cache of `size` slots whose newest written position is `last` [1].

        Column c holds position last - ((last - c) mod size) (negative: never written). Its mask is the column of
        `mask` [1,1,T,C] at that position (the caller's causal and padding rules), also hidden outside the window.
        A column whose position lies past the query or outside its window hides itself, whatever the mask says.
        """
        offsets = torch.arange(size, dtype=torch.int32)  # int32 throughout: the GPU has no int64
        held = last - torch.remainder(last - offsets, size)
        visible = (held[None, :] >= 0) & (held[None, :] <= query_pos[:, None]) & \
            (held[None, :] > (query_pos[:, None] - window))
        window_mask = torch.where(visible, 0.0, MASK_HIDDEN)
        return cls(torch.minimum(take(mask, 3, held.clamp(0, mask.shape[-1] - 1)), window_mask))

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               scales: KvScales | None = None) -> torch.Tensor:
        """attend() over the viewed slots of K [1,Hkv,C,hd] and V^T [1,Hkv,hd,C] (int8 ones dequantized by `scales`)."""
        if self.index is not None:
            k_cache, v_cache = take(k_cache, 2, self.index), take(v_cache, 3, self.index)
        if is_quantized(k_cache):
            k_cache, v_cache = dequantize_caches(k_cache, v_cache, scales)
        return attend(q, k_cache, v_cache, self.mask)


def write_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                input_pos: torch.Tensor, mode: str = "scatter", scales: KvScales | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Write rows k [1,Hkv,T,hd] and v [1,Hkv,T,hd] at input_pos into K [1,Hkv,C,hd] and V^T [1,Hkv,hd,C]
    (quantized by `scales` into int8 caches).

    "scatter" writes row i at input_pos[i] (ONNX ScatterElements, done in place by onnxruntime); "dus" writes the
    T rows as one block starting at input_pos[0] (LiteRT DYNAMIC_UPDATE_SLICE: the only form LiteRT-LM's runtime
    updates correctly, since it fills the padding rows of a prefill chunk with positions of its own).
    """
    if is_quantized(k_cache):
        k, v = quantize_rows(k, v, scales)
    _, hkv, t, hd = k.shape
    v = v.transpose(2, 3)
    if mode == "dus":
        from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice

        zero, start = torch.zeros([], dtype=torch.int32), input_pos[0].reshape([]).to(torch.int32)
        return (dynamic_update_slice(k_cache, k, [zero, zero, start, zero]),
                dynamic_update_slice(v_cache, v, [zero, zero, zero, start]))
    k_index = input_pos.long().view(1, 1, t, 1).expand(1, hkv, t, hd)
    v_index = input_pos.long().view(1, 1, 1, t).expand(1, hkv, hd, t)
    # rows arrive in the compute dtype (bf16 under autocast), the cache keeps its own
    return k_cache.scatter(2, k_index, k.to(k_cache.dtype)), v_cache.scatter(3, v_index, v.to(v_cache.dtype))


def ring_sources(start: torch.Tensor, rows: int, size: int) -> torch.Tensor:
    """[size] int32: for each ring slot, its column in concat(ring, T new rows) after writing the rows of positions
    start..start+T-1 (`start` [1]) at slots position mod size; needs T <= size."""
    offsets = torch.arange(size, dtype=torch.int32)
    row = torch.remainder(offsets - start, size)
    return torch.where(row < rows, size + row, offsets)


def write_ring(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               sources: torch.Tensor, scales: KvScales | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Write rows k, v [1,Hkv,T,hd] into ring caches K [1,Hkv,S,hd] and V^T [1,Hkv,hd,S] by `ring_sources`
    (quantized by `scales` into int8 caches).

    One gather over the ring and the new rows: it wraps around the ring's end, which a block write cannot, and it
    is GATHER with int32 indices (GPU-delegable) where a scatter is not.
    """
    if is_quantized(k_cache):
        k, v = quantize_rows(k, v, scales)
    k_all = torch.cat([k_cache, k.to(k_cache.dtype)], dim=2)
    v_all = torch.cat([v_cache, v.transpose(2, 3).to(v_cache.dtype)], dim=3)
    return take(k_all, 2, sources), take(v_all, 3, sources)


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention of q [1,H,T,hd] over K [1,Hkv,C,hd], V^T [1,Hkv,hd,C]; mask [1,1,T,C] or [T,C].

    Scale 1 (q and k are normalised), softmax in fp32. Query heads of one KV head are folded into the row axis so
    every matmul is a plain 4-D one. The mask rows are concatenated once per group (repeat() is BROADCAST_TO, and
    adding [1,1,T,C] to the scores reshaped to [1,H,T,C] trips a converter bug at T = 1 with one KV head). Every
    intermediate is 4-D. Returns [1, T, H*hd].
    """
    _, h, t, hd = q.shape
    hkv = k_cache.shape[1]
    groups = h // hkv
    scores = torch.matmul(q.reshape(1, hkv, groups * t, hd), k_cache.transpose(2, 3)).float()
    scores = scores + torch.cat([mask.reshape(1, 1, t, -1)] * groups, dim=2)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(v_cache, probs.transpose(2, 3))  # [1, Hkv, hd, G*T]
    return out.transpose(2, 3).reshape(1, h, t, hd).transpose(1, 2).reshape(1, t, h * hd)


class MLP(nn.Module):
    """GELU(tanh)-gated feed-forward."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Attention(nn.Module):
    """Gemma 4 attention projections; with own_kv it also projects K/V, otherwise it only queries a cache."""

    def __init__(self, spec: AttentionGeometry, layer: int, own_kv: bool):
        super().__init__()
        hd = spec.layer_head_dim(layer)
        self.head_dim = hd
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.q_proj = nn.Linear(spec.hidden_size, spec.num_heads * hd, bias=False)
        self.q_norm = RMSNorm(hd, spec.rms_eps)
        self.own_kv = own_kv
        if own_kv:
            self.k_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * hd, bias=False)
            self.v_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * hd, bias=False)
            self.k_norm = RMSNorm(hd, spec.rms_eps)
            self.v_norm = RMSNorm(hd, spec.rms_eps, with_scale=False)
        self.o_proj = nn.Linear(spec.num_heads * hd, spec.hidden_size, bias=False)

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """q [1, H, T, hd]: projected, normalised, roped."""
        t = x.shape[1]
        q = self.q_norm(self.q_proj(x).view(1, t, self.num_heads, self.head_dim)).transpose(1, 2)
        return apply_rope(q, cos, sin)

    def key_value(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New k, v rows [1, Hkv, T, hd] (k roped; v normalised without weight, not roped)."""
        t = x.shape[1]
        k = self.k_norm(self.k_proj(x).view(1, t, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_norm(self.v_proj(x).view(1, t, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        return apply_rope(k, cos, sin), v


class DecoderLayer(nn.Module):
    """Pre/post-normed attention and MLP, optional PLE branch, then the layer scalar.

    `forward` takes a callable computing the attention output from the normalised input, so the same layer serves
    the target (own or shared cache) and the drafter (query-only over the target's cache).
    """

    def __init__(self, spec: AttentionGeometry, layer: int, own_kv: bool, inter: int, ple_dim: int = 0):
        super().__init__()
        h, eps = spec.hidden_size, spec.rms_eps
        self.self_attn = Attention(spec, layer, own_kv)
        self.mlp = MLP(h, inter)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.register_buffer("layer_scalar", torch.ones(1))
        self.ple_dim = ple_dim
        if ple_dim:
            self.per_layer_input_gate = nn.Linear(h, ple_dim, bias=False)
            self.per_layer_projection = nn.Linear(ple_dim, h, bias=False)
            self.post_per_layer_input_norm = RMSNorm(h, eps)

    def forward(self, h: torch.Tensor, attention, per_layer_input: torch.Tensor | None = None) -> torch.Tensor:
        h = h + self.post_attention_layernorm(attention(self.input_layernorm(h)))
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        if self.ple_dim:
            gated = F.gelu(self.per_layer_input_gate(h), approximate="tanh") * per_layer_input
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return h * self.layer_scalar


def embed_scale(width: int, dtype: torch.dtype) -> float:
    """sqrt(width) as transformers applies it to an embedding stored in `dtype`."""
    return stored_scale(math.sqrt(width), dtype)
