"""`edge-mtp inspect` for checkpoint directories: geometry, parameter counts, KV sharing, KV bytes per token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint.layout import drafter_tensors, parameter_count, target_tensors
from ..checkpoint.locate import resolve_checkpoint
from ..checkpoint.spec import read_config, spec_to_dict, target_spec_from_config
from ..model.loading import read_drafter_spec


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


def describe_bundle(path: Path, verify: bool = True) -> dict[str, Any]:
    """Sections, model types, signatures and tensor names/shapes/dtypes of a .litertlm bundle (with `verify`, only
    after every section matched its recorded sha256, so a corrupt model never reaches the interpreter)."""
    from ..bundle.litertlm import read_litertlm

    bundle = read_litertlm(path, verify=verify)
    sections = []
    for s in bundle.sections:
        row: dict[str, Any] = {"type": s.data_type, "model_type": s.model_type, "bytes": s.end - s.begin}
        if s.data_type == "tflite_model":
            row["signatures"] = tflite_signatures(bundle.read(s))
        sections.append(row)
    return {"path": str(path), "version": ".".join(map(str, bundle.version)), "bytes": path.stat().st_size,
            "supports_mtp": bundle.model_section("tf_lite_mtp_drafter") is not None, "manifest": bundle.manifest,
            "sections": sections}


def tflite_signatures(model: bytes) -> dict[str, dict[str, list]]:
    """Every signature of a TFLite flatbuffer with its input/output names, shapes and dtypes."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    out = {}
    for name in interpreter.get_signature_list():
        runner = interpreter.get_signature_runner(name)
        out[name] = {kind: [{"name": n, "shape": [int(d) for d in t["shape"]], "dtype": t["dtype"].__name__}
                            for n, t in sorted(details.items())]
                     for kind, details in (("inputs", runner.get_input_details()),
                                           ("outputs", runner.get_output_details()))}
    return out
