"""What a bundle manifest (.litertlm or ONNX) records, checked: its format version and its Contract.

Manifests are untrusted bytes: a wrong type, a missing key or an impossible size becomes one EdgeMtpError here,
before any runtime allocates a cache or hands a model to native code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator

from ..checkpoint.spec import check_pair
from ..model.contract import Contract, contract_from_dict
from ..model.kv_quant import scales_from_dicts
from ..util.errors import EdgeMtpError

MAX_CONTEXT = 1 << 20  # tokens; far beyond Gemma 4's 128k, below what would allocate absurd caches
MAX_DRAFT_LEN = 64


def file_blocks(path: Path, begin: int = 0, end: int | None = None, chunk: int = 1 << 22) -> Iterator[bytes]:
    """Bytes [begin, end) of a file (default: all of it) in chunks of up to 4 MiB; stops early at the file's end."""
    with open(path, "rb") as f:
        f.seek(begin)
        left = end - begin if end is not None else None
        while (left is None or left > 0) and (block := f.read(chunk if left is None else min(chunk, left))):
            yield block
            left = left - len(block) if left is not None else None


def sha256_file(path: Path, begin: int = 0, end: int | None = None) -> str:
    """Hex sha256 of bytes [begin, end) of a file (default: all of it)."""
    digest = hashlib.sha256()
    for block in file_blocks(path, begin, end):
        digest.update(block)
    return digest.hexdigest()


def check_format_version(version: Any, where: str, readable: int) -> None:
    """A manifest's format_version must be a positive integer no newer than the `readable` one."""
    if type(version) is not int or version < 1:
        raise EdgeMtpError(f"{where} has an invalid manifest format_version {version!r}; re-export the bundle.")
    if version > readable:
        raise EdgeMtpError(f"{where} was written by a newer edge-mtp (manifest format version {version}, this version "
                           f"reads up to {readable}); upgrade edge-mtp to run it.")


def checked_contract(manifest: dict[str, Any], where: str) -> Contract:
    """The Contract of a manifest dictionary; anything malformed is reported naming `where`."""
    if not isinstance(manifest, dict) or not manifest.get("target"):
        raise EdgeMtpError(f"{where} has no edge-mtp manifest; only bundles written by edge-mtp export can be run here.")
    for key, low, high in (("context", 2, MAX_CONTEXT), ("draft_len", 1, MAX_DRAFT_LEN)):
        value = manifest.get(key)
        if type(value) is not int or not low <= value <= high:
            raise EdgeMtpError(f"{where}: {key} = {value!r} is not an integer in [{low}, {high}]; the manifest is "
                               "corrupt, re-export the bundle.")
    lengths = manifest.get("prefill_lengths")
    if not (isinstance(lengths, list) and 1 <= len(lengths) <= 64
            and all(type(n) is int and 1 <= n <= manifest["context"] for n in lengths)):
        raise EdgeMtpError(f"{where}: prefill_lengths = {lengths!r} is not a list of token counts within the context; "
                           "the manifest is corrupt, re-export the bundle.")
    if manifest.get("kv_dtype", "float32") not in ("float32", "float16", "int8"):
        raise EdgeMtpError(f"{where}: kv_dtype {manifest.get('kv_dtype')!r} is not supported; re-export the bundle.")
    try:
        if manifest.get("kv_dtype") == "int8" and not _scales_ok(manifest):
            raise EdgeMtpError("kv_dtype is int8 but kv_scales does not give a positive scale per channel for each "
                               "attention type of the target; the manifest is corrupt, re-export the bundle.")
        contract = contract_from_dict(manifest)
        if contract.drafter is not None:
            check_pair(contract.target, contract.drafter)
        return contract
    except EdgeMtpError as e:
        raise EdgeMtpError(f"{where}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise EdgeMtpError(f"{where} is malformed ({type(e).__name__}: {e}); re-export the bundle.") from None


def _scales_ok(manifest: dict[str, Any]) -> bool:
    """Whether an int8-KV manifest's kv_scales hold a finite positive scale per channel and one for values, for
    every attention type of its target."""
    records = manifest.get("kv_scales")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        return False
    try:
        scales = {s.kind: s for s in scales_from_dicts(records)}
    except (KeyError, TypeError, ValueError):  # binascii.Error is a ValueError
        return False
    spec = contract_from_dict({**manifest, "kv_scales": None}).target
    widths = {spec.layer_types[i]: spec.layer_head_dim(i) for i in spec.kv_layers}
    return all(kind in scales and len(scales[kind].key) == width
               and all(0 < x < float("inf") for x in (*scales[kind].key, scales[kind].value))
               for kind, width in widths.items())
