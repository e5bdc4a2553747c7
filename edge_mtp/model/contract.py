"""The on-device I/O contract (litertlm-mtp.md): model and signature names, tensor names, shapes and dtypes.

Modules implement it, exporters trace into it, runtimes bind it and manifests record it; nothing else spells a
tensor name or shape by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..checkpoint.spec import SLIDING, DrafterSpec, TargetSpec, spec_from_dict
from .kv_quant import KvScales, scales_from_dicts

# Model (section) names inside a bundle.
EMBEDDER, PER_LAYER_EMBEDDER, TARGET, DRAFTER = "embedder", "per_layer_embedder", "target", "drafter"
# Signature names.
DECODE, VERIFY, DRAFT = "decode", "verify", "mtp_drafter"
# Tensor names.
TOKEN_IDS, EMBEDDINGS, PLE = "token_ids", "embeddings", "per_layer_embeddings"
INPUT_POS, MASK, LOGITS = "input_pos", "mask", "logits"
PARAM_TENSOR = "param_tensor"  # LiteRT-LM's cache-update parameters: {start, start+len, start+len, 0, 0, 0, 0}
ACTIVATIONS, PROJECTED = "activations", "projected_activations"

MASK_VISIBLE = 0.0
MASK_HIDDEN = -0.7 * float(np.finfo(np.float32).max)  # LiteRT-LM's fill for masked f32 entries


def k_name(layer: int) -> str:
    """Name of the K cache of target layer `layer`."""
    return f"kv_cache_k_{layer}"


def v_name(layer: int) -> str:
    """Name of the V cache of target layer `layer`."""
    return f"kv_cache_v_{layer}"


def kv_output_name(name: str) -> str:
    """ONNX name of an updated cache output (a graph output cannot reuse its input's name; LiteRT keeps the name)."""
    return f"{name}_out"


def prefill_name(length: int) -> str:
    """Signature name of the prefill over `length` tokens."""
    return f"prefill_{length}"


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a signature."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name

    def zeros(self) -> np.ndarray:
        """A zero-filled array of this tensor's shape and dtype."""
        return np.zeros(self.shape, dtype=self.dtype)


@dataclass(frozen=True)
class Signature:
    """Inputs and outputs of one callable graph."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class Contract:
    """Everything a bundle exposes, derived from the pair's specs and the export choices."""

    target: TargetSpec
    drafter: DrafterSpec | None
    context: int
    draft_len: int = 3
    prefill_lengths: tuple[int, ...] = (32,)
    kv_dtype: str = "float32"
    param_tensor: bool = False  # LiteRT targets: take PARAM_TENSOR and write the caches in place (model/kv_update.py)
    sliding_ring: bool = False  # sliding layers keep a ring of `ring_size` slots instead of the whole context
    kv_scales: tuple[KvScales, ...] = ()  # int8 caches: the static scales per attention type (model/kv_quant.py)

    def __post_init__(self) -> None:
        if self.context < max(self.prefill_lengths) or self.context < self.draft_len + 2:
            raise ValueError(f"context {self.context} is smaller than a prefill or verify window")

    def scales_by_kind(self) -> dict[str, KvScales]:
        """The int8 caches' scales by attention type, as Target.kv_scales and Drafter.kv_scales take them."""
        return {s.kind: s for s in self.kv_scales}

    def kv_record(self) -> dict[str, Any]:
        """The manifest's record of the caches' type (and int8 scales), which contract_from_dict reads back."""
        record: dict[str, Any] = {"kv_dtype": self.kv_dtype}
        if self.kv_scales:
            record["kv_scales"] = [s.to_dict() for s in self.kv_scales]
        return record

    @property
    def verify_len(self) -> int:
        return self.draft_len + 1

    @property
    def ring_size(self) -> int:
        """Slots of a sliding layer's ring cache, or 0 when its cache spans the context.

        Position p lives in slot p mod S. A call of T rows writes all T (LiteRT-LM's prefill padding rows and a
        verify's rejected drafts too) before it attends, so the ring must still hold the window behind its first
        row after that write: S = window + T - 1 for the longest call. Caches written in place (param_tensor) keep
        the context: LiteRT's in-place cache kernel writes one block, which cannot wrap.
        """
        size = self.target.sliding_window + max(*self.prefill_lengths, self.verify_len) - 1
        ring = self.sliding_ring and not self.param_tensor and SLIDING in self.target.layer_types
        return size if ring and size < self.context else 0

    def can_resume(self, written: int, at: int) -> bool:
        """Whether caches holding rows up to position `written` (exclusive) can continue at position `at` <= written:
        a ring has overwritten the keys of the window behind `at` once the rows past it reach around."""
        return not self.ring_size or written - at <= self.ring_size - self.target.sliding_window + 1

    def cache_length(self, layer: int) -> int:
        """Slots of target layer `layer`'s cache: the ring size for a sliding layer of a ring contract, else C."""
        ring = self.ring_size
        return ring if ring and self.target.layer_types[layer] == SLIDING else self.context

    def kv_tensors(self) -> tuple[TensorSpec, ...]:
        """Every cache tensor of the target: K [1,Hkv,S,hd] and transposed V [1,Hkv,hd,S] per cache-owning layer,
        S = cache_length (the context, or a sliding layer's ring)."""
        t = self.target
        out = []
        for i in t.kv_layers:
            hd, c = t.layer_head_dim(i), self.cache_length(i)
            out.append(TensorSpec(k_name(i), (1, t.num_kv_heads, c, hd), self.kv_dtype))
            out.append(TensorSpec(v_name(i), (1, t.num_kv_heads, hd, c), self.kv_dtype))
        return tuple(out)

    def drafter_kv_tensors(self) -> tuple[TensorSpec, ...]:
        """The target caches the drafter reads: the store layers of the attention types it uses."""
        assert self.drafter is not None
        wanted = {self.target.store_layers[k] for k in self.drafter.layer_types}
        keep = {k_name(i) for i in wanted} | {v_name(i) for i in wanted}
        return tuple(s for s in self.kv_tensors() if s.name in keep)

    def embedder(self) -> Signature:
        """token_ids int32 [1,1] -> embeddings [1,1,H]."""
        return Signature(EMBEDDER, (TensorSpec(TOKEN_IDS, (1, 1), "int32"),),
                         (TensorSpec(EMBEDDINGS, (1, 1, self.target.hidden_size), "float32"),))

    def per_layer_embedder(self) -> Signature:
        """token_ids int32 [1,1] -> per_layer_embeddings [1,1,NL,P]."""
        t = self.target
        return Signature(PER_LAYER_EMBEDDER, (TensorSpec(TOKEN_IDS, (1, 1), "int32"),),
                         (TensorSpec(PLE, (1, 1, t.num_layers, t.ple_dim), "float32"),))

    def target_inputs(self, length: int) -> tuple[TensorSpec, ...]:
        """Inputs of a target signature over `length` tokens."""
        t = self.target
        ins = [TensorSpec(EMBEDDINGS, (1, length, t.hidden_size), "float32")]
        if t.ple_dim:
            ins.append(TensorSpec(PLE, (1, length, t.num_layers, t.ple_dim), "float32"))
        ins += [TensorSpec(INPUT_POS, (length,), "int32"), TensorSpec(MASK, (1, 1, length, self.context), "float32")]
        if self.param_tensor:
            ins.append(TensorSpec(PARAM_TENSOR, (1, 1, 1, 7), "int32"))
        return tuple(ins) + self.kv_tensors()

    def target_signature(self, name: str, length: int) -> Signature:
        """A target signature; prefill returns only the caches, decode and verify also logits and activations."""
        t = self.target
        outs = self.kv_tensors()
        if not name.startswith("prefill_"):
            outs = (TensorSpec(LOGITS, (1, length, t.vocab_size), "float32"),
                    TensorSpec(ACTIVATIONS, (1, length, t.hidden_size), "float32")) + outs
        return Signature(name, self.target_inputs(length), outs)

    def target_signatures(self) -> tuple[Signature, ...]:
        """prefill_<T> for each prefill length, then decode (T=1) and verify (T=G+1)."""
        sigs = [self.target_signature(prefill_name(n), n) for n in self.prefill_lengths]
        sigs.append(self.target_signature(DECODE, 1))
        if self.drafter is not None:
            sigs.append(self.target_signature(VERIFY, self.verify_len))
        return tuple(sigs)

    def drafter_signature(self) -> Signature:
        """mtp_drafter: activations [1,1,2H], input_pos [1], mask [1,1,1,C] (param_tensor when the target takes one),
        store caches -> logits, carry."""
        t = self.target
        ins = (TensorSpec(ACTIVATIONS, (1, 1, 2 * t.hidden_size), "float32"), TensorSpec(INPUT_POS, (1,), "int32"),
               TensorSpec(MASK, (1, 1, 1, self.context), "float32"))
        if self.param_tensor:  # it reads caches written in place, which takes the in-place read (model/kv_update.py)
            ins += (TensorSpec(PARAM_TENSOR, (1, 1, 1, 7), "int32"),)
        ins += self.drafter_kv_tensors()
        outs = (TensorSpec(LOGITS, (1, 1, t.vocab_size), "float32"),
                TensorSpec(PROJECTED, (1, 1, t.hidden_size), "float32"))
        return Signature(DRAFT, ins, outs)


def contract_from_dict(data: dict[str, Any]) -> Contract:
    """The Contract a bundle manifest records (specs, context, draft length, prefill lengths, KV dtype and int8
    scales, param_tensor, sliding_ring; bundles written before param_tensor or sliding_ring existed have none)."""
    drafter = spec_from_dict(DrafterSpec, data["drafter"]) if data.get("drafter") else None
    return Contract(spec_from_dict(TargetSpec, data["target"]), drafter, int(data["context"]), int(data["draft_len"]),
                    tuple(data["prefill_lengths"]), data.get("kv_dtype", "float32"), bool(data.get("param_tensor")),
                    bool(data.get("sliding_ring")), scales_from_dicts(data.get("kv_scales") or ()))


def param_values(start: int, length: int) -> np.ndarray:
    """PARAM_TENSOR as LiteRT-LM fills it for `length` new rows at position `start`."""
    out = np.zeros((1, 1, 1, 7), dtype=np.int32)
    out.flat[:3] = start, start + length, start + length
    return out


def causal_mask(start: int, length: int, context: int, valid: int | None = None) -> np.ndarray:
    """[1,1,length,context] f32 mask as LiteRT-LM fills it: row i sees keys [0, start+i].

    Rows at or beyond `valid` (padding of a partly filled prefill) see only key 0 so their softmax stays finite.
    """
    rows = np.arange(length)[:, None]
    keys = np.arange(context)[None, :]
    visible = keys <= start + rows
    if valid is not None:
        visible = np.where(rows < valid, visible, keys == 0)
    return np.where(visible, MASK_VISIBLE, MASK_HIDDEN).astype(np.float32)[None, None]


def drafter_mask(last_committed: int, context: int) -> np.ndarray:
    """[1,1,1,context] mask of a draft step: keys [0, last_committed] (= input_pos) visible."""
    return causal_mask(last_committed, 1, context)
