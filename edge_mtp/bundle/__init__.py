"""The two bundle formats, read and written in one place: `.litertlm` files (litertlm) and ONNX bundle folders
(onnx), their manifests and version checks (manifest), their tokenizers (tokenizer), and `open_bundle`, which gives
any bundle's checked contract, tokenizer and models. Everything here reads untrusted bytes and reports bad ones as
one EdgeMtpError (tests/fuzz_targets.py fuzzes it); nothing here runs a model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..model.contract import EMBEDDER, TARGET, Contract
from ..util.errors import EdgeMtpError
from .litertlm import SECTION_MODEL_TYPES, LitertlmFile, Section, read_litertlm
from .manifest import checked_contract
from .onnx_folder import MANIFEST, contract_from_manifest, read_manifest, tokenizer_info
from .tokenizer import Tokenizer, bundle_tokenizer

LITERTLM, ONNX = "litertlm", "onnx"


@dataclass
class Bundle:
    """An opened bundle: its format, checked contract, tokenizer, manifest, and where each model is (a section of
    the .litertlm file, or a file of the ONNX folder)."""

    path: Path
    format: str
    contract: Contract
    tokenizer: Tokenizer
    manifest: dict[str, Any]
    models: dict[str, Section | Path]
    file: LitertlmFile | None = None  # the parsed .litertlm container


def open_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """A .litertlm file or an ONNX bundle folder, with every section or file checked against its recorded sha256
    (unless `verify` is False) before anything reaches a native runtime."""
    path = Path(path)
    if path.is_dir():
        manifest = read_manifest(path, verify=verify)
        contract = contract_from_manifest(manifest, str(path / MANIFEST))
        models = {name: path / record["file"] for name, record in manifest.get("models", {}).items()}
        if TARGET not in models or EMBEDDER not in models:
            raise EdgeMtpError(f"{path / MANIFEST} names no target or embedder model; re-export the bundle.")
        return Bundle(path, ONNX, contract, Tokenizer(**tokenizer_info(path, manifest)), manifest, models)
    if not path.exists():
        raise EdgeMtpError(f"Bundle {path} does not exist; pass a .litertlm file or an ONNX bundle folder.")
    if path.suffix != ".litertlm":
        raise EdgeMtpError(f"{path} is not a bundle edge-mtp can run (expected a .litertlm file or an ONNX bundle "
                           "folder).")
    file = read_litertlm(path, verify=verify)
    contract = checked_contract(file.manifest, str(path))
    models = {name: s for name, kind in SECTION_MODEL_TYPES.items() if (s := file.model_section(kind)) is not None}
    return Bundle(path, LITERTLM, contract, bundle_tokenizer(file), file.manifest, models, file)
