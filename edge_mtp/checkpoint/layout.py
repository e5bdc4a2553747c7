"""The Hugging Face checkpoint layout of a spec: every tensor's name, shape, role and owning module.

The one place tensor names of checkpoints are written down; the loader, the synthetic writer and `inspect` all
iterate over it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .spec import DrafterSpec, TargetSpec

# Roles decide how the synthetic writer initialises a tensor (gemma4.md §5) and whether it counts as a parameter.
WEIGHT, NORM, SCALAR, ORDERING = "weight", "norm", "scalar", "ordering"

TEXT_PREFIX = "model."
MULTIMODAL_PREFIX = "model.language_model."


@dataclass(frozen=True)
class TensorEntry:
    """One checkpoint tensor: its name without the model prefix, shape, role and where it lands in our modules."""

    name: str
    shape: tuple[int, ...]
    role: str
    modules: tuple[str, ...]  # our modules that hold it ('embedder', 'per_layer_embedder', 'target', 'drafter')
    local: str  # attribute path inside those modules

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_parameter(self) -> bool:
        """transformers counts weights and norms as parameters; layer scalars and token orderings are buffers."""
        return self.role in (WEIGHT, NORM)


def _decoder_layer(spec, i: int, prefix: str, module: str, own_kv: bool, ple: bool, inter: int) -> Iterator[TensorEntry]:
    h, hd = spec.hidden_size, spec.layer_head_dim(i)
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
    rows = [
        ("layer_scalar", (1,), SCALAR),
        ("self_attn.q_proj.weight", (q, h), WEIGHT),
        ("self_attn.q_norm.weight", (hd,), NORM),
    ]
    if own_kv:
        rows += [("self_attn.k_proj.weight", (kv, h), WEIGHT), ("self_attn.v_proj.weight", (kv, h), WEIGHT),
                 ("self_attn.k_norm.weight", (hd,), NORM)]
    rows += [
        ("self_attn.o_proj.weight", (h, q), WEIGHT),
        ("mlp.gate_proj.weight", (inter, h), WEIGHT),
        ("mlp.up_proj.weight", (inter, h), WEIGHT),
        ("mlp.down_proj.weight", (h, inter), WEIGHT),
        ("input_layernorm.weight", (h,), NORM),
        ("post_attention_layernorm.weight", (h,), NORM),
        ("pre_feedforward_layernorm.weight", (h,), NORM),
        ("post_feedforward_layernorm.weight", (h,), NORM),
    ]
    if ple:
        p = spec.ple_dim
        rows += [("per_layer_input_gate.weight", (p, h), WEIGHT), ("per_layer_projection.weight", (h, p), WEIGHT),
                 ("post_per_layer_input_norm.weight", (h,), NORM)]
    for name, shape, role in rows:
        yield TensorEntry(f"{prefix}layers.{i}.{name}", shape, role, (module,), f"layers.{i}.{name}")


def target_tensors(spec: TargetSpec) -> Iterator[TensorEntry]:
    """Every tensor of a Gemma 4 text target (names relative to the 'model.' / 'model.language_model.' prefix)."""
    h, n, p = spec.hidden_size, spec.num_layers, spec.ple_dim
    yield TensorEntry("embed_tokens.weight", (spec.vocab_size, h), WEIGHT, ("embedder", "target"), "embed_tokens.weight")
    if p:
        yield TensorEntry("embed_tokens_per_layer.weight", (spec.ple_vocab_size, n * p), WEIGHT,
                          ("per_layer_embedder",), "embed_tokens_per_layer.weight")
        yield TensorEntry("per_layer_model_projection.weight", (n * p, h), WEIGHT, ("target",),
                          "per_layer_model_projection.weight")
        yield TensorEntry("per_layer_projection_norm.weight", (p,), NORM, ("target",), "per_layer_projection_norm.weight")
    for i in range(n):
        yield from _decoder_layer(spec, i, "", "target", i < spec.first_shared_layer, bool(p),
                                  spec.layer_intermediate_size(i))
    yield TensorEntry("norm.weight", (h,), NORM, ("target",), "norm.weight")


def drafter_tensors(spec: DrafterSpec) -> Iterator[TensorEntry]:
    """Every tensor of a Gemma 4 assistant checkpoint (full names; the lm_head is tied to model.embed_tokens)."""
    h, hb = spec.hidden_size, spec.backbone_hidden_size
    yield TensorEntry("model.embed_tokens.weight", (spec.vocab_size, h), WEIGHT, ("drafter",), "embed_tokens.weight")
    for i in range(spec.num_layers):
        yield from _decoder_layer(spec, i, "model.", "drafter", False, False, spec.intermediate_size)
    yield TensorEntry("model.norm.weight", (h,), NORM, ("drafter",), "norm.weight")
    yield TensorEntry("pre_projection.weight", (h, 2 * hb), WEIGHT, ("drafter",), "pre_projection.weight")
    yield TensorEntry("post_projection.weight", (hb, h), WEIGHT, ("drafter",), "post_projection.weight")
    if spec.use_ordered_embeddings:
        yield TensorEntry("masked_embedding.centroids.weight", (spec.num_centroids, h), WEIGHT, ("drafter",),
                          "centroids.weight")
        yield TensorEntry("masked_embedding.token_ordering", (spec.vocab_size,), ORDERING, ("drafter",),
                          "token_ordering")


def parameter_count(entries: Iterator[TensorEntry]) -> int:
    """Number of parameters as transformers counts them (buffers excluded)."""
    return sum(e.numel for e in entries if e.is_parameter)
