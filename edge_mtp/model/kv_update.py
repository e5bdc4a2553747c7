"""A LiteRT target's cache writes and reads as LiteRT's in-place cache ops, fed by LiteRT-LM's `param_tensor`.

LiteRT-LM (0.18.1) keeps one KV buffer per cache, updated in place, only when the target takes `param_tensor`
(int32 [1,1,1,7], `{start, start+len, start+len, 0...}`); on the GPU that is also the only mode in which it lends the
target's caches to the MTP drafter. In that mode the cache is bound as the signature's output alone, and a
DYNAMIC_UPDATE_SLICE, which copies its cache input into its output, reads and writes the same WebGPU buffer in one
dispatch (WebGPU validation refuses that). LiteRT's GPU delegate instead lowers the StableHLO composite
`odml.cache_update` to a kernel that writes only the new rows, at param_tensor[0]; every other runtime (the CPU,
our checks) runs the composite's decomposition, the same DYNAMIC_UPDATE_SLICE as before, so CPU numerics are
unchanged.

The composite's operands and attributes are the ones LiteRT's WebGPU delegate (ai-edge-litert 2.3) parses: 7 inputs
(new K rows [1,Hkv,T,hd], new V rows [1,Hkv,T,hd], param_tensor, K cache [1,Hkv,C,hd], V^T cache [1,Hkv,hd,C], the
K and V start indices [4]), 2 outputs (the caches), attributes kv_cache_batch_size, cache_size, head_size and
is_ring_buffer. The kernel reads the write offset from param[0] and the number of rows from param[3].

A cache written that way can only be read on the GPU through `odml.runtime_bmm` marked `rhs_cache_update` (a plain
BATCH_MATMUL or GATHER of the composite's output reads something else: the GPU then generated other text than the
CPU), so attention over it is `attend_in_place`, with no gathered sliding window.
"""

from __future__ import annotations

import torch

from .contract import MASK_HIDDEN
from .kv_quant import KvScales
from .layers import KeyView, tracing_for_litert, write_cache


def write_rows(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               input_pos: torch.Tensor, mode: str, param: torch.Tensor | None = None,
               scales: KvScales | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """write_cache(k_cache, v_cache, k, v, input_pos, mode, scales), as `odml.cache_update` when `param` is given
    (fp32 caches only: export.options refuses an int8 cache written in place).

    Without `param` (ONNX, bundles without param_tensor) this is layers.write_cache. With it, the T rows are written
    as one block at input_pos[0] (the "dus" form); traced for LiteRT, that block write is wrapped in the composite.
    """
    if param is None:
        return write_cache(k_cache, v_cache, k, v, input_pos, mode, scales)
    if not tracing_for_litert():
        return write_cache(k_cache, v_cache, k, v, input_pos, "dus")
    from litert_torch.backend.composite import StableHLOCompositeBuilder
    from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice

    _, hkv, _, hd = k.shape
    # The kernel writes param[3] rows from param[0]; LiteRT-LM fills only {start, end, end}, so the row count is
    # put in place here (what litert-torch's own exports do too).
    param = torch.cat([param[..., :3], param[..., 1:2] - param[..., :1], param[..., 4:]], dim=-1)
    zero, start = torch.zeros(1, dtype=torch.int32), input_pos[:1].to(torch.int32)
    k_start, v_start = torch.cat([zero, zero, start, zero]), torch.cat([zero, zero, zero, start])
    builder = StableHLOCompositeBuilder("odml.cache_update", attr={
        "kv_cache_batch_size": hkv, "cache_size": k_cache.shape[2], "head_size": hd, "is_ring_buffer": False})
    k, v, param, k_cache, v_cache, k_start, v_start = builder.mark_inputs(k, v, param, k_cache, v_cache, k_start,
                                                                          v_start)
    # The decomposition must read every operand, or the converter drops it from the composite; an exact zero.
    anchor = (param.sum() * 0).to(k.dtype)
    k_new = dynamic_update_slice(k_cache, k + anchor, [k_start[i] for i in range(4)])
    v_new = dynamic_update_slice(v_cache, v.transpose(2, 3) + anchor, [v_start[i] for i in range(4)])
    return builder.mark_outputs(k_new, v_new)


def cache_matmul(a: torch.Tensor, cache: torch.Tensor, param: torch.Tensor, values: bool) -> torch.Tensor:
    """a [1,Hkv,R,X] times a cache written by write_rows, transposed: K [1,Hkv,C,hd] -> [1,Hkv,R,C] (X = hd), or
    V^T [1,Hkv,hd,C] -> [1,Hkv,R,hd] (X = C, `values`).

    On LiteRT's GPU an in-place cache can only be read through `odml.runtime_bmm` marked as reading a cache-update
    output (it covers the param[2] written slots); elsewhere this is the plain matmul.
    """
    if not tracing_for_litert():
        return torch.matmul(a, cache.transpose(2, 3))
    from litert_torch.backend.composite import StableHLOCompositeBuilder
    from litert_torch.backend.experimental.torch_tfl._ops import tfl_batch_matmul

    builder = StableHLOCompositeBuilder("odml.runtime_bmm", attr={
        "is_global": True, "is_src": values, "rhs_cache_update": True})
    a, cache, param = builder.mark_inputs(a, cache, param)
    # The decomposition is one BATCH_MATMUL: a plain matmul with a single KV head converts to FULLY_CONNECTED
    # without bias, and LiteRT-LM's CPU executor (0.18.1), which inlines composites, binds that omitted bias to
    # another tensor ("Input tensor N lacks data" at the first prefill).
    out = tfl_batch_matmul(a, cache, adj_y=True)
    return builder.mark_outputs(out + (param.sum() * 0).to(a.dtype))


def attend_in_place(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                    param: torch.Tensor) -> torch.Tensor:
    """layers.attend over caches written in place (every read through cache_matmul); returns [1, T, H*hd].

    Hidden keys are selected away rather than masked by addition: on the GPU, slots past param[2] hold no scores.
    """
    _, h, t, hd = q.shape
    hkv = k_cache.shape[1]
    groups = h // hkv
    scores = cache_matmul(q.reshape(1, hkv, groups * t, hd), k_cache, param, values=False).float()
    visible = torch.cat([mask.reshape(1, 1, t, -1)] * groups, dim=2) == 0
    # the GPU's SELECT_V2 wants the condition in the output's shape and a scalar alternative
    scores = torch.where(torch.cat([visible] * hkv, dim=1), scores, MASK_HIDDEN)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = cache_matmul(probs, v_cache, param, values=True)  # [1, Hkv, G*T, hd]
    return out.reshape(1, h, t, hd).transpose(1, 2).reshape(1, t, h * hd)


def read_cache(view: KeyView, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               param: torch.Tensor | None, scales: KvScales | None = None) -> torch.Tensor:
    """Attention of q over a key view of the caches: the in-place way when they are written in place (`param`)."""
    if param is None:
        return view.attend(q, k_cache, v_cache, scales)
    return attend_in_place(q, k_cache, v_cache, view.mask, param)
