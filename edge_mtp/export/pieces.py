"""The target cut into pieces that convert one at a time and join by tensor name (export.joiner.GraphJoiner).

prelude: signature inputs -> the layer context (RoPE tables, key views, PLE rows), once for all layers;
layer i: hidden state `h` + its context entries + the caches it reads -> `h` (+ the caches it writes);
head:    `h` -> logits, activations.
Each piece registers only the submodules it uses, so only its weights need to be loaded. Layer pieces use
generic tensor names (`k_cache`, `ple`, ...) so that layers of one kind share one conversion; `Piece.rename`
gives the joined names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from ..checkpoint.spec import FULL, SLIDING, TargetSpec
from ..model.contract import INPUT_POS, MASK, Contract, Signature, k_name, v_name
from ..model.target import Target
from .signatures import random_cache

HIDDEN = "h"


class Prelude(nn.Module):
    """embeddings, per_layer_embeddings, input_pos, mask -> Target.layer_context (less what it passes through)."""

    def __init__(self, target: Target):
        super().__init__()
        object.__setattr__(self, "target", target)  # not a submodule: only the weights below belong to the piece
        if target.spec.ple_dim:
            self.per_layer_model_projection = target.per_layer_model_projection
            self.per_layer_projection_norm = target.per_layer_projection_norm
        for kind in (SLIDING, FULL):
            self.register_buffer(f"inv_freq_{kind}", getattr(target, f"inv_freq_{kind}"), persistent=False)

    def forward(self, embeddings: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor,
                per_layer_embeddings: torch.Tensor | None = None,
                param_tensor: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        context = self.target.layer_context(embeddings, per_layer_embeddings, input_pos, mask,
                                            in_place=param_tensor is not None)
        return {k: v for k, v in context.items() if k not in (INPUT_POS, MASK)}


def generic_name(name: str) -> str:
    """The name a layer piece gives a context entry or cache: the same for every layer of a kind."""
    if name.startswith("kv_cache_k_"):
        return "k_cache"
    if name.startswith("kv_cache_v_"):
        return "v_cache"
    if name.startswith("ple_"):
        return "ple"
    for stem in ("rope_cos", "rope_sin", "index", "mask"):
        if name.startswith(stem):
            return stem
    return name


class LayerPiece(nn.Module):
    """Decoder layer i of the target with generic input/output names."""

    def __init__(self, target: Target, i: int, available: set[str]):
        super().__init__()
        object.__setattr__(self, "target", target)
        self.layer = target.layers[i]
        self.index = i
        self.names = {generic_name(n): n for n in target.layer_inputs(i) if n in available}
        self.writes = target.spec.kv_source(i) == i

    def forward(self, h: torch.Tensor, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        real = {self.names[g]: v for g, v in inputs.items()}
        caches = {n: real.pop(n) for n in list(real) if n.startswith("kv_cache_")}
        out = {HIDDEN: self.target.layer(self.index, h, real, caches)}
        if self.writes:
            out["k_cache"], out["v_cache"] = caches[k_name(self.index)], caches[v_name(self.index)]
        return out


HEAD = "head"  # the LM head's piece; the embedders' pieces are named after their models
ROW_CHUNK_BYTES = 64 << 20  # fp32 bytes of table rows quantized at a time


class Head(nn.Module):
    """h -> final norm, tied softcapped LM head: logits, activations."""

    def __init__(self, target: Target):
        super().__init__()
        object.__setattr__(self, "target", target)
        self.norm, self.embed_tokens = target.norm, target.embed_tokens

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.target.head(h)


def layer_kind(spec: TargetSpec, i: int) -> tuple:
    """Layers of one kind have identical graphs up to their weights (attention type, own cache, MLP width)."""
    return spec.layer_types[i], spec.kv_source(i) == i, spec.layer_intermediate_size(i)


@dataclass
class PieceSamples:
    """Inputs a piece is traced and checked on: per signature name, one dict per seed (seed 0 traces)."""

    by_signature: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)

    def first(self) -> dict[str, dict[str, np.ndarray]]:
        """The tracing inputs of every signature."""
        return {name: rows[0] for name, rows in self.by_signature.items()}


def _rng_array(shape: tuple[int, ...], seed: int, name: str, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    return (rng.standard_normal(shape) * scale).astype(np.float32)


class PieceInputs:
    """Realistic inputs for every piece: the contract's signature inputs, the prelude's context computed from them by
    PyTorch, random hidden states, and random caches made only when a piece asks for them (all caches of a
    real-size model at once would be gigabytes)."""

    def __init__(self, contract: Contract, prelude: Prelude, seeds: tuple[int, ...] = (0, 100, 101)):
        from .signatures import sample_inputs

        self.contract, self.seeds = contract, seeds
        self.caches = {s.name: s for s in contract.kv_tensors()}
        self.base: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        self.signatures: list[Signature] = list(contract.target_signatures())
        with torch.no_grad():
            for sig in self.signatures:
                for seed in seeds:
                    inputs = sample_inputs(sig, self.contract, seed=seed, caches=False)
                    context = prelude(**{k: torch.from_numpy(v) for k, v in inputs.items()})
                    self.base[sig.name, seed] = {**inputs, **{k: v.numpy() for k, v in context.items()}}

    def available(self) -> set[str]:
        """Every name a layer piece may read."""
        sig = self.signatures[0]
        return set(self.base[sig.name, self.seeds[0]]) | set(self.caches)

    def prelude(self) -> PieceSamples:
        """The prelude's inputs: the signature inputs without caches."""
        names = [s.name for s in self.signatures[0].inputs if s.name not in self.caches]
        return PieceSamples({sig.name: [{n: self.base[sig.name, seed][n] for n in names} for seed in self.seeds]
                             for sig in self.signatures})

    def layer(self, piece: LayerPiece) -> PieceSamples:
        """A layer piece's inputs, under its generic names."""
        out = PieceSamples()
        for sig in self.signatures:
            rows = []
            for seed in self.seeds:
                base = self.base[sig.name, seed]
                length = base["embeddings"].shape[1]
                row = {HIDDEN: _rng_array((1, length, self.contract.target.hidden_size), seed, HIDDEN, 2.0)}
                for generic, real in piece.names.items():
                    row[generic] = base[real] if real in base else random_cache(
                        self.caches[real], np.random.default_rng([seed, sum(map(ord, real))]))
                rows.append(row)
            out.by_signature[sig.name] = rows
        return out

    def head(self) -> PieceSamples:
        """The head's inputs (decode and verify only: prefill returns no logits)."""
        out = PieceSamples()
        for sig in self.signatures:
            if any(o.name == "logits" for o in sig.outputs):
                length = self.base[sig.name, self.seeds[0]]["embeddings"].shape[1]
                out.by_signature[sig.name] = [
                    {HIDDEN: _rng_array((1, length, self.contract.target.hidden_size), seed, HIDDEN, 2.0)}
                    for seed in self.seeds]
        return out


def layer_rename(target: Target, i: int, piece: LayerPiece) -> dict[str, str]:
    """Generic piece names -> joined names for layer i (the hidden state keeps its name)."""
    names = dict(piece.names)
    if piece.writes:
        names["k_cache"], names["v_cache"] = k_name(i), v_name(i)
    return names


def small_vocab(avoid: set[int], vocab: int) -> int:
    """Rows of the small table: a prime no other dimension of the model shares (so widening finds exactly the
    vocabulary axes), or the whole vocabulary when it is that small already."""
    n = 97
    while n in avoid or any(n % k == 0 for k in range(2, int(n ** 0.5) + 1)):
        n += 1
    return min(n, vocab)


def digest(data) -> bytes:
    """A short digest of a buffer's bytes: how a piece's weights are found by content in a converted graph."""
    return hashlib.blake2b(data, digest_size=16).digest()
