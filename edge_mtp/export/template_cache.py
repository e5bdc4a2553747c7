"""Converted layer templates kept between exports.

A layer kind's template (its graph converted with placeholder weights, see export.driver) depends only on the
geometry, the contract, our model code and the converter, never on the checkpoint's weights. Converting one costs
31-88 s per E2B layer kind (1-11 s on the small presets), so a second export of the same geometry (another recipe, a
fine-tuned checkpoint) takes them from here. A stale or damaged file cannot slip through: every layer made from a
template is still checked against its PyTorch piece, and a template whose weights cannot be located is converted
afresh. Templates of other code versions can never be used again, so storing one removes them (they are 7-60 MB
each, and a cache that only grows filled the disk of a real-size export).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

from ..util.cache import cache_root

_GRAPH_CODE = ("checkpoint/spec.py", "model", "export/pieces.py", "export/litert.py", "export/signatures.py")


@lru_cache(maxsize=1)
def _code_digest() -> str:
    """Hash of the sources a layer graph is built from, and the converter's versions."""
    from importlib.metadata import version

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(f"torch {version('torch')} litert-torch {version('litert-torch')}".encode())
    for name in _GRAPH_CODE:
        for path in sorted((root / name).rglob("*.py")) if (root / name).is_dir() else [root / name]:
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def template_key(spec, contract, first_layer: int, cache_write: str, samples: dict) -> str:
    """Everything a layer template's graph depends on, hashed."""
    shapes = {sig: {k: [list(v.shape), str(v.dtype)] for k, v in rows[0].items()} for sig, rows in samples.items()}
    described = {"spec": dataclasses.asdict(spec), "context": contract.context, "draft_len": contract.draft_len,
                 "prefill": list(contract.prefill_lengths), "layer": first_layer, "cache_write": cache_write,
                 "kv": contract.kv_record(),  # int8 caches: the scales are constants of the graph
                 "inputs": shapes, "code": _code_digest()}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _path(key: str) -> Path:
    return cache_root() / "templates" / f"{_code_digest()[:12]}-{key}.tflite"


def fetch(key: str, to: Path) -> bool:
    """Copy a cached template to `to`; False when there is none."""
    try:
        shutil.copyfile(_path(key), to)
        return True
    except OSError:
        return False


def store(key: str, template: Path) -> None:
    """Keep a converted template (best effort: a cache that cannot be written only costs time next export)."""
    path = _path(key)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, partial)
        os.replace(partial, path)
        for old in path.parent.glob("*.tflite"):
            if not old.name.startswith(_code_digest()[:12]):
                old.unlink(missing_ok=True)
    except OSError:
        partial.unlink(missing_ok=True)
