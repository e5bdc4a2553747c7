"""The ONNX bundle: a folder of .onnx graphs, tokenizer files and `manifest.json`, written and read back here.

The manifest records the I/O contract (signature, tensor names, shapes, dtypes), the KV layout and the rule naming
an updated cache output, both specs, the tokenizer files and the sha256 of every file. Reading it back checks the
format version and every file, so a runtime never starts on a truncated or modified bundle. No torch import here:
the runtime side uses this module too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..checkpoint.spec import spec_to_dict
from ..model.contract import (DRAFTER, EMBEDDER, PER_LAYER_EMBEDDER, TARGET, Contract, Signature, TensorSpec,
                              kv_output_name)
from ..util.errors import EdgeMtpError
from .manifest import check_format_version, checked_contract, sha256_file

FORMAT = "edge-mtp-onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKEN_AXIS = "T"
KV_LAYOUT = {"k": "[1,Hkv,C,hd]", "v": "[1,Hkv,hd,C]", "sequence_axis": {"k": 2, "v": 3},
             "owners": "one K/V pair per cache-owning (non-KV-shared) target layer; the drafter reads the store "
                       "layers' caches under the same names"}
KV_OUTPUT_RULE = kv_output_name("{name}")  # "{name}_out": an updated cache is a graph output named <input>_out
TOKENIZER_FILE, TOKENIZER_CONFIG, CHAT_TEMPLATE = "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"


def model_file(model: str) -> str:
    """File name of a bundle model ('target' -> 'target.onnx')."""
    return f"{model}.onnx"


def _tensor(spec: TensorSpec, onnx_name: str | None = None) -> dict[str, Any]:
    out = {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype}
    if onnx_name and onnx_name != spec.name:
        out["onnx_name"] = onnx_name
    return out


def onnx_output_name(contract: Contract, name: str) -> str:
    """The graph output carrying contract output `name` (caches get the _out suffix, other names are kept)."""
    return kv_output_name(name) if name in {s.name for s in contract.kv_tensors()} else name


def signature_entry(contract: Contract, model: str, signature: Signature) -> dict[str, Any]:
    """Manifest record of one contract signature and the model file that runs it."""
    return {"model": model, "file": model_file(model),
            "inputs": [_tensor(s) for s in signature.inputs],
            "outputs": [_tensor(s, onnx_output_name(contract, s.name)) for s in signature.outputs]}


def contract_signatures(contract: Contract) -> dict[str, tuple[str, Signature]]:
    """Every signature of the bundle, keyed by name, with the model that owns it."""
    out = {contract.embedder().name: (EMBEDDER, contract.embedder())}
    if contract.target.ple_dim:
        out[contract.per_layer_embedder().name] = (PER_LAYER_EMBEDDER, contract.per_layer_embedder())
    for sig in contract.target_signatures():
        out[sig.name] = (TARGET, sig)
    if contract.drafter is not None:
        out[contract.drafter_signature().name] = (DRAFTER, contract.drafter_signature())
    return out


def build_manifest(contract: Contract, models: dict[str, dict[str, Any]], tokenizer: dict[str, Any],
                   root: Path, quantization: str = "fp32") -> dict[str, Any]:
    """The manifest of a finished bundle folder `root` (every file in it is hashed)."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(root).as_posix()
        files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "draft_len": contract.draft_len, "context": contract.context,
        "prefill_lengths": list(contract.prefill_lengths), "kv_dtype": contract.kv_dtype,
        "kv_layout": KV_LAYOUT, "kv_output_name": KV_OUTPUT_RULE,
        "target": spec_to_dict(contract.target),
        "drafter": spec_to_dict(contract.drafter) if contract.drafter is not None else None,
        "models": models,
        "signatures": {name: signature_entry(contract, model, sig)
                       for name, (model, sig) in contract_signatures(contract).items()},
        "tokenizer": tokenizer, "quantization": quantization, "files": files,
    }


def contract_from_manifest(manifest: dict[str, Any], where: str) -> Contract:
    """The Contract a manifest describes; its recorded signatures must be exactly the ones the contract derives."""
    contract = checked_contract(manifest, where)
    recorded = manifest.get("signatures")
    if not isinstance(recorded, dict):
        raise EdgeMtpError(f"{where} records no signatures; re-export the bundle.")
    for name, (model, sig) in contract_signatures(contract).items():
        if recorded.get(name) != signature_entry(contract, model, sig):
            raise EdgeMtpError(f"{where}: signature '{name}' does not match the contract its specs define; "
                               "the manifest was edited or written by an incompatible exporter, re-export the bundle.")
    return contract


def read_manifest(root: str | Path, verify: bool = True) -> dict[str, Any]:
    """manifest.json of a bundle folder after checking format, version, and (verify) every file's size and sha256."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise EdgeMtpError(f"{root} is not an ONNX bundle folder; export one with `edge-mtp export --format onnx`.")
    if not path.is_file():
        raise EdgeMtpError(f"{root} has no {MANIFEST}, so it is not an edge-mtp ONNX bundle; export one with "
                           "`edge-mtp export --format onnx`.")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, RecursionError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise EdgeMtpError(f"{path} is not readable JSON ({type(e).__name__}); re-export the bundle.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EdgeMtpError(f"{path} is not an edge-mtp ONNX manifest (format "
                           f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, expected '{FORMAT}').")
    check_format_version(manifest.get("format_version"), str(root), FORMAT_VERSION)
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(manifest.get("models", {}), dict):
        raise EdgeMtpError(f"{path} lists no files; re-export the bundle.")
    for rel, info in files.items():
        file = bundle_file(root, rel, path)
        if not isinstance(info, dict) or type(info.get("bytes")) is not int or not isinstance(info.get("sha256"), str):
            raise EdgeMtpError(f"{path}: the entry of {rel} has no size and sha256; re-export the bundle.")
        _check_file(root, rel, file, info, verify)
    for model in manifest.get("models", {}).values():
        if not isinstance(model, dict) or not isinstance(model.get("file"), str) or model["file"] not in files:
            raise EdgeMtpError(f"{path} names model file {model.get('file') if isinstance(model, dict) else model!r} "
                               "without listing it under 'files'; re-export the bundle.")
    return manifest


def _check_file(root: Path, rel: str, file: Path, info: dict[str, Any], verify: bool) -> None:
    """One listed file: present, of the recorded size and (verify) sha256."""
    try:
        size = file.stat().st_size if file.is_file() else None
    except OSError:
        size = None
    if size is None:
        raise EdgeMtpError(f"{root} is incomplete: {rel}, listed in {MANIFEST}, is missing; copy the whole "
                           "bundle folder again or re-export it.")
    if size != info["bytes"]:
        raise EdgeMtpError(f"{file} has {size} bytes but {MANIFEST} records {info['bytes']}; "
                           "the file is truncated or was replaced, copy the bundle again or re-export it.")
    if verify and sha256_file(file) != info["sha256"]:
        raise EdgeMtpError(f"{file} does not match its sha256 in {MANIFEST}; the file is corrupted or was "
                           "modified, copy the bundle again or re-export it.")


def bundle_file(root: Path, rel: Any, manifest: Path) -> Path:
    """The file a manifest names, which must be a relative path that stays inside the bundle folder."""
    ok = isinstance(rel, str) and rel and "\x00" not in rel and not Path(rel).is_absolute()
    if ok:
        try:
            ok = (root / rel).resolve().is_relative_to(root.resolve())
        except (OSError, RuntimeError):
            ok = False
    if not ok:
        raise EdgeMtpError(f"{manifest} names {rel!r}, which is not a file inside the bundle folder; the manifest is "
                           "corrupt, re-export the bundle.")
    return root / rel


def tokenizer_info(root: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of runtime.api.Tokenizer: tokenizer_json text, bos, stop_tokens, chat_template."""
    root = Path(root)
    where = root / MANIFEST
    tok = manifest.get("tokenizer")
    if not isinstance(tok, dict) or not tok.get("file"):
        raise EdgeMtpError(f"{root} has no tokenizer recorded in {MANIFEST}; re-export the bundle.")
    bos, stops, template = tok.get("bos"), tok.get("stop_tokens"), tok.get("chat_template")
    if type(bos) is not int or not isinstance(stops, list) or not all(type(t) is int for t in stops):
        raise EdgeMtpError(f"{where}: the tokenizer's bos / stop_tokens are not token ids; re-export the bundle.")
    try:
        return {"tokenizer_json": bundle_file(root, tok["file"], where).read_text(), "bos": bos, "stop_tokens": stops,
                "chat_template": bundle_file(root, template, where).read_text() if template else None}
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeMtpError(f"{root}: cannot read its tokenizer files ({e}); copy the bundle again or re-export "
                           "it.") from None


def is_onnx_bundle(path: str | Path) -> bool:
    """Whether `path` looks like an edge-mtp ONNX bundle folder (has a manifest naming our format)."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except (ValueError, OSError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT
