"""Build .litertlm variants for bad-input and fuzz tests: the real writer over a real (or stand-in) bundle's parts."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Callable

from edge_mtp.bundle.litertlm import MODEL_TYPES, SECTIONS_KEY, BundleMetadata, read_litertlm, write_litertlm
from edge_mtp.checkpoint.spec import preset_pair, spec_to_dict
from edge_mtp.model.contract import Contract


def rewrap(src: Path, out: Path, edit: Callable[[dict[str, Any]], None] = lambda m: None) -> Path:
    """Rewrite `src` with write_litertlm after `edit` changed its manifest (sections and hashes recomputed)."""
    bundle = read_litertlm(src)
    work = out.parent / f".{out.name}.parts"
    work.mkdir(parents=True, exist_ok=True)
    models = {}
    for name, model_type in MODEL_TYPES.items():
        section = bundle.model_section(f"tf_lite_{model_type.lower()}")
        if section is not None:
            models[name] = work / f"{name}.tflite"
            models[name].write_bytes(bundle.read(section))
    (work / "tokenizer.json").write_text(bundle.tokenizer_json())
    manifest = {k: v for k, v in bundle.manifest.items() if k != SECTIONS_KEY}
    contract = Contract(*_specs(manifest), manifest["context"], manifest["draft_len"], tuple(manifest["prefill_lengths"]))
    edit(manifest)
    write_litertlm(out, models, contract, work / "tokenizer.json", BundleMetadata(2, [1]), manifest, work)
    return out


def _specs(manifest: dict[str, Any]):
    from edge_mtp.checkpoint.spec import DrafterSpec, TargetSpec, spec_from_dict

    drafter = spec_from_dict(DrafterSpec, manifest["drafter"]) if manifest.get("drafter") else None
    return spec_from_dict(TargetSpec, manifest["target"]), drafter


def stand_in_bundle(out: Path, tokenizer_json: Path) -> Path:
    """A small, valid container for the tiny preset whose model sections are a few placeholder bytes each
    (enough for every reader; nothing native ever sees them)."""
    target, drafter = preset_pair("tiny")
    contract = Contract(target, drafter, 64, 3, (8,))
    work = out.parent / f".{out.name}.parts"
    work.mkdir(parents=True, exist_ok=True)
    models = {}
    for i, name in enumerate(MODEL_TYPES):
        models[name] = work / f"{name}.tflite"
        models[name].write_bytes(bytes([i]) * 24)
    manifest = {"format": "edge-mtp-litertlm", "format_version": 1, "draft_len": 3, "context": 64,
                "prefill_lengths": [8], "target": spec_to_dict(target), "drafter": spec_to_dict(drafter),
                "quantization": "fp32"}
    write_litertlm(out, models, contract, tokenizer_json, BundleMetadata(2, [1]), manifest, work)
    return out


def flip(src: Path, out: Path, offset: int, count: int = 8) -> Path:
    """A copy of `src` with `count` bytes inverted from `offset`."""
    data = bytearray(src.read_bytes())
    for i in range(offset, min(offset + count, len(data))):
        data[i] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


def with_container_version(src: Path, out: Path, major: int) -> Path:
    """A copy of `src` claiming another container major version."""
    data = bytearray(src.read_bytes())
    data[8:12] = struct.pack("<I", major)
    out.write_bytes(bytes(data))
    return out
