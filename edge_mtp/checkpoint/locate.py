"""Where a checkpoint's files are: a directory, a Hugging Face repo in the local cache, or a LoRA adapter directory
(PEFT's adapter_config.json and adapter_model.safetensors) whose config, tokenizer and weights are its base's."""

from __future__ import annotations

import json
from pathlib import Path

from ..util.errors import EdgeMtpError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def resolve_checkpoint(path_or_repo: str | Path) -> Path:
    """A checkpoint directory from a local path, or from a Hugging Face repo id already in the local cache."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo)
    if path.exists():
        raise EdgeMtpError(f"{path} is a file; pass the checkpoint directory that holds config.json.")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(repo_id=text, local_files_only=True))
        except Exception:
            raise EdgeMtpError(f"'{text}' is neither a directory nor a repo in the local Hugging Face cache; download "
                               "it first (huggingface-cli download) or pass a checkpoint directory.") from None
    raise EdgeMtpError(f"Checkpoint directory {path} does not exist.")


def adapter_base(directory: Path) -> Path | None:
    """The base checkpoint directory a LoRA adapter directory names (its base_model_name_or_path: a directory,
    absolute or relative to the adapter, or a cached repo id); None for a directory that holds no adapter."""
    config = directory / ADAPTER_CONFIG
    if not config.is_file():
        return None
    try:
        base = json.loads(config.read_text())["base_model_name_or_path"]
        if not isinstance(base, str) or not base:
            raise TypeError
    except (ValueError, KeyError, TypeError, RecursionError):  # JSON and UTF-8 errors too
        raise EdgeMtpError(f"{config} names no base_model_name_or_path; set it to the base checkpoint the adapter "
                           "was trained on.") from None
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise EdgeMtpError(f"{directory} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; save the adapter in "
                           "safetensors form.")
    beside = directory / base
    try:
        found = beside if beside.is_dir() else resolve_checkpoint(base)
    except EdgeMtpError:
        raise EdgeMtpError(f"The base checkpoint {base} of the adapter in {directory} is not on this machine "
                           f"(base_model_name_or_path in {config.name}); download it or point that entry at "
                           "its directory.") from None
    if (found / ADAPTER_CONFIG).is_file():
        raise EdgeMtpError(f"The base {found} of the adapter in {directory} is itself an adapter; point "
                           f"base_model_name_or_path in {config.name} at the full checkpoint.")
    return found


def checkpoint_files(directory: Path) -> Path:
    """The directory holding config.json and the tokenizer files of a checkpoint: an adapter's base, else itself."""
    return adapter_base(directory) or directory
