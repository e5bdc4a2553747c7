"""Spec -> Hugging Face config.json / generation_config.json dictionaries (the inverse of spec parsing)."""

from __future__ import annotations

from typing import Any

from .spec import FULL, AttentionGeometry, DrafterSpec, TargetSpec

_HF_TYPES = {"sliding": "sliding_attention", FULL: "full_attention"}


def _text_config(spec: AttentionGeometry) -> dict[str, Any]:
    return {
        "model_type": "gemma4_text",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "global_head_dim": spec.global_head_dim,
        "layer_types": [_HF_TYPES[t] for t in spec.layer_types],
        "sliding_window": spec.sliding_window,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": spec.rms_eps,
        "max_position_embeddings": 131072,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": spec.rope_theta_sliding},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": spec.partial_rotary_full,
                               "rope_theta": spec.rope_theta_full},
        },
        "attention_bias": False,
        "attention_k_eq_v": False,
        "enable_moe_block": False,
        "tie_word_embeddings": True,
        "dtype": spec.dtype,
    }


def target_config(spec: TargetSpec, multimodal: bool = False) -> dict[str, Any]:
    """config.json of a text-only Gemma4ForCausalLM, or of the multimodal wrapper (text path only)."""
    text = _text_config(spec) | {
        "num_kv_shared_layers": spec.num_kv_shared_layers,
        "hidden_size_per_layer_input": spec.ple_dim,
        "vocab_size_per_layer_input": spec.ple_vocab_size,
        "use_double_wide_mlp": spec.double_wide_mlp,
        "final_logit_softcapping": spec.final_softcap,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": list(spec.eos_token_ids),
        "pad_token_id": spec.pad_token_id,
    }
    if not multimodal:
        return text | {"architectures": ["Gemma4ForCausalLM"]}
    return {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"], "text_config": text,
            "dtype": spec.dtype}


def drafter_config(spec: DrafterSpec) -> dict[str, Any]:
    """config.json of a Gemma4AssistantForCausalLM."""
    text = _text_config(spec) | {"num_kv_shared_layers": spec.num_layers, "hidden_size_per_layer_input": 0,
                                 "vocab_size_per_layer_input": 0, "use_double_wide_mlp": False,
                                 "final_logit_softcapping": None}
    return {
        "model_type": "gemma4_assistant",
        "architectures": ["Gemma4AssistantForCausalLM"],
        "text_config": text,
        "backbone_hidden_size": spec.backbone_hidden_size,
        "use_ordered_embeddings": spec.use_ordered_embeddings,
        "num_centroids": spec.num_centroids,
        "centroid_intermediate_top_k": spec.centroid_top_k,
        "tie_word_embeddings": True,
        "dtype": spec.dtype,
    }


def generation_config(target: TargetSpec, num_assistant_tokens: int | None = None) -> dict[str, Any]:
    """generation_config.json; the assistant's carries num_assistant_tokens (the draft length transformers uses)."""
    cfg: dict[str, Any] = {"bos_token_id": target.bos_token_id, "eos_token_id": list(target.eos_token_ids),
                           "pad_token_id": target.pad_token_id}
    if num_assistant_tokens is not None:
        cfg["num_assistant_tokens"] = num_assistant_tokens
        cfg["num_assistant_tokens_schedule"] = "constant"
    return cfg
