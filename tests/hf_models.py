"""Tiny Gemma 4 models built and saved by transformers itself (the numerical reference), initialised as gemma4.md §5."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4Config, Gemma4ForCausalLM,
                          Gemma4ForConditionalGeneration, Gemma4TextConfig)

from edge_mtp.checkpoint.hf_config import drafter_config, target_config
from edge_mtp.checkpoint.spec import DrafterSpec, TargetSpec


def _text_kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "dtype")}


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """std 0.2 weights, norms and layer scalars 1 ± 0.1, token_ordering a permutation (defaults hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.copy_(1 + 0.1 * torch.randn(b.shape, generator=gen))
        elif name.endswith("token_ordering"):
            b.copy_(torch.randperm(b.numel(), generator=gen))
    return model.eval()


def hf_target(spec: TargetSpec, seed: int = 0, multimodal: bool = False) -> torch.nn.Module:
    """A transformers Gemma4ForCausalLM (or the multimodal wrapper, text only) of this geometry, randomised."""
    text = Gemma4TextConfig(**_text_kwargs(target_config(spec)))
    if multimodal:
        model = Gemma4ForConditionalGeneration(Gemma4Config(text_config=text.to_dict()))
    else:
        model = Gemma4ForCausalLM(text)
    return randomise(model, seed)


def hf_assistant(spec: DrafterSpec, seed: int = 1) -> torch.nn.Module:
    """A transformers Gemma4AssistantForCausalLM of this geometry, randomised, with num_assistant_tokens set."""
    cfg = drafter_config(spec)
    text = _text_kwargs(cfg["text_config"])
    model = Gemma4AssistantForCausalLM(Gemma4AssistantConfig(
        text_config=text, backbone_hidden_size=spec.backbone_hidden_size,
        use_ordered_embeddings=spec.use_ordered_embeddings, num_centroids=spec.num_centroids,
        centroid_intermediate_top_k=spec.centroid_top_k))
    model.generation_config.num_assistant_tokens = spec.num_assistant_tokens
    model.generation_config.num_assistant_tokens_schedule = "constant"
    return randomise(model, seed)


def save(model: torch.nn.Module, directory: Path) -> Path:
    """save_pretrained into `directory` and return it."""
    model.save_pretrained(directory)
    return directory
