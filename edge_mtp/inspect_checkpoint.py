"""`edge-mtp inspect` for checkpoint directories: geometry, parameter counts, KV sharing, KV bytes per token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import resolve_checkpoint
from .layout import drafter_tensors, parameter_count, target_tensors
from .model.loading import read_drafter_spec
from .spec import read_config, spec_to_dict, target_spec_from_config


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """A JSON-friendly description of a target or assistant checkpoint directory (reads config.json only)."""
    directory = resolve_checkpoint(path)
    cfg = read_config(directory)
    if cfg.get("model_type") == "gemma4_assistant":
        spec = read_drafter_spec(directory)
        return {"kind": "assistant", "path": str(directory), "parameters": parameter_count(drafter_tensors(spec)),
                "geometry": spec_to_dict(spec)}
    spec = target_spec_from_config(cfg, where=str(directory / "config.json"))
    return {
        "kind": "target",
        "path": str(directory),
        "parameters": parameter_count(target_tensors(spec)),
        "parameters_without_ple_table": parameter_count(e for e in target_tensors(spec)
                                                        if e.name != "embed_tokens_per_layer.weight"),
        "kv_store_layers": spec.store_layers,
        "kv_layers": list(spec.kv_layers),
        "kv_reuse_layers": {i: spec.kv_source(i) for i in range(spec.first_shared_layer, spec.num_layers)},
        "kv_bytes_per_token_bf16": spec.kv_bytes_per_token(2),
        "geometry": spec_to_dict(spec),
    }
