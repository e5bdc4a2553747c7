"""The int8 KV cache: symmetric, zero point 0, with static scales derived from the checkpoint's weights.

LiteRT-LM allocates each cache with the graph's declared type and zero-fills it, and knows no quantization of its
own, so the graphs quantize on write and dequantize on read, and zero must mean zero (zero point 0). The scales are
constants inside the graphs: no state a runtime would have to know about.

Gemma 4 caches normalised rows. A value row is RMSNorm'd without a scale, so each element is at most sqrt(head_dim)
in magnitude; a key row is RMSNorm'd with the k_norm weight w, then rotated (RoPE mixes channel c with c + hd/2), so
channel c is at most sqrt(head_dim) * max(|w_c|, |w_{c+hd/2}|). An RMS-normalised row rarely comes near that bound,
so the scales clip at CLIP times the row's RMS instead (chosen by measured logit error, docs/quantization.md). One set of scales serves all layers of an attention type (the largest weight per channel
among them): the exporter converts one graph per layer type, and the drafter reads the target's caches by type.
The cache holds the int8 values; a cache of another dtype (an fp32 reference run) is read and written as it is.
"""

from __future__ import annotations

import base64
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch

QMAX = 127
CLIP = 5.0  # multiples of a row's RMS kept unclipped (docs/quantization.md: the lowest logit error measured)


@dataclass(frozen=True)
class KvScales:
    """The static scales of one attention type's int8 caches: per channel for K, one value for V."""

    kind: str
    key: tuple[float, ...]
    value: float

    def to_dict(self) -> dict[str, Any]:
        """The manifest's record of these scales: the first half of the key scales (a RoPE pair shares its scale) as
        base64 float32, exact and small, since the manifest lives in a .litertlm header that LiteRT-LM reads only
        16 KiB of (Gemma 4's 768 key scales written as JSON numbers took 15 KB)."""
        half = len(self.key) // 2
        if self.key[:half] != self.key[half:]:
            raise ValueError(f"the {self.kind} key scales are not paired as RoPE pairs them")
        packed = base64.b64encode(np.asarray(self.key[:half], "<f4").tobytes()).decode()
        return {"kind": self.kind, "key_half_f32": packed, "value": self.value}


def scales_from_dicts(records: Iterable[dict[str, Any]]) -> tuple[KvScales, ...]:
    """The scales a manifest records (KvScales.to_dict); ValueError, KeyError or TypeError if malformed."""
    out = []
    for r in records:
        half = tuple(float(x) for x in np.frombuffer(base64.b64decode(r["key_half_f32"], validate=True), "<f4"))
        out.append(KvScales(r["kind"], half + half, float(r["value"])))
    return tuple(out)


def derive_scales(kind: str, k_norm_weights: Iterable[torch.Tensor], clip: float = CLIP) -> KvScales:
    """Scales of one attention type from the k_norm weights of its cache-owning layers (see module doc)."""
    weights = torch.stack([w.detach().float().abs() for w in k_norm_weights])
    hd = weights.shape[-1]
    widest = weights.amax(0)
    paired = torch.maximum(widest, widest.roll(hd // 2))  # RoPE's rotate-half pairs share a bound
    bound = min(clip, math.sqrt(hd))
    key = (paired * bound / QMAX).clamp_min(torch.finfo(torch.float32).tiny)
    return KvScales(kind, tuple(float(x) for x in key), bound / QMAX)


def quantize_rows(k: torch.Tensor, v: torch.Tensor, scales: KvScales) -> tuple[torch.Tensor, torch.Tensor]:
    """New rows k, v [1,Hkv,T,hd] as int8 (round half to even, clipped to +-QMAX)."""
    inverse_key = torch.tensor([1.0 / s for s in scales.key], dtype=torch.float32)
    k_steps, v_steps = k.float() * inverse_key, v.float() * (1.0 / scales.value)
    if _graph_rows:
        return _graph_rows.pop(0)(k_steps, v_steps)
    return _to_int8(k_steps), _to_int8(v_steps)


def _to_int8(steps: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(steps), -QMAX, QMAX).to(torch.int8)


# While a converted graph is checked against its module (rounded_as), one entry per cache write still to come.
_graph_rows: list = []
BOUNDARY = 1e-3  # steps from a rounding boundary within which two float computations of one row may round apart


@contextmanager
def rounded_as(rows: list[tuple[np.ndarray, np.ndarray]]) -> Iterator[None]:
    """Check a converted graph's int8 rows, then let the module round as the graph did: the graph computes a row
    in another order than PyTorch, so a value a float rounding away from a rounding boundary may land one step
    apart, and every later output of the call then differs by more than float rounding. Each cache write of the
    module (in layer order) takes the graph's rows (k, v [1,Hkv,T,hd] int8) where they differ from its own by
    one step at a boundary, and keeps its own rounding anywhere else, so a wrong quantizer still fails the check."""
    def take_graph_rows(graph_k: np.ndarray, graph_v: np.ndarray):
        def rounding(k_steps: torch.Tensor, v_steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = []
            for steps, graph in ((k_steps, graph_k), (v_steps, graph_v)):
                ours, theirs = _to_int8(steps), torch.from_numpy(np.ascontiguousarray(graph))
                at_boundary = (steps.abs() - steps.abs().floor() - 0.5).abs() < BOUNDARY
                one_step = (ours.int() - theirs.int()).abs() == 1
                out.append(torch.where(at_boundary & one_step, theirs, ours))
            return out[0], out[1]
        return rounding

    _graph_rows[:] = [take_graph_rows(k, v) for k, v in rows]
    try:
        yield
    finally:
        _graph_rows.clear()


def dequantize_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, scales: KvScales
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 K [1,Hkv,C,hd] and V^T [1,Hkv,hd,C] from their int8 values."""
    key = torch.tensor(scales.key, dtype=torch.float32)
    return k_cache.float() * key, v_cache.float() * scales.value


def is_quantized(cache: torch.Tensor) -> bool:
    """Whether a cache holds int8 values (else it is read and written as it is)."""
    return cache.dtype == torch.int8
