"""Prepared distillation data on disk: safetensors shards of fixed-length sequences plus one JSON index.

Every shard holds, for its n sequences of L positions: `tokens` [n,L] int32, `loss_mask` [n,L] uint8 (1 where a draft
round starting at that position is trained), `prompt_len` and `length` [n] int32, the target's `activations`
[n,L,H], the K/V rows `k_<i>`/`v_<i>` [n,L,Hkv,hd] of its store layers i, and its `top_k` largest logits
(`teacher_values` fp32, `teacher_indices` int32, [n,L,k]). Beside them: `embeddings.safetensors` (the target's token
embedding table, which the drafter's input and initialisation read) and `target_config.json`. Files are written
atomically and read memory-mapped, a row at a time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.spec import TargetSpec, target_spec_from_config
from ..util.atomic import atomic_file
from ..util.errors import EdgeMtpError
from .teacher import store_layers

INDEX = "index.json"
EMBEDDINGS = "embeddings.safetensors"
TARGET_CONFIG = "target_config.json"
FORMAT = 1
TRAIN, EVAL = "train", "eval"
# sources of a checkpoint's fingerprint: what the target's numbers depend on
FINGERPRINT_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "adapter_config.json")


def fingerprint(*directories: Path) -> str:
    """sha256 over the config and weight files of checkpoint directories (a base and its adapter, say)."""
    digest = hashlib.sha256()
    for directory in directories:
        for path in sorted({p for pat in FINGERPRINT_PATTERNS for p in Path(directory).glob(pat) if p.is_file()}):
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
    return digest.hexdigest()


def bytes_per_token(spec: TargetSpec, top_k: int, dtype: torch.dtype) -> int:
    """Shard bytes one sequence position costs for `spec` (tokens, mask, activations, store-layer K/V, top-k)."""
    width = torch.tensor([], dtype=dtype).element_size()
    kv = sum(2 * spec.num_kv_heads * spec.layer_head_dim(i) for i in store_layers(spec))
    return 4 + 1 + width * (spec.hidden_size + kv) + 8 * top_k


@dataclass
class ShardSet:
    """An opened shard folder: its index, and every sequence addressable by (split, global number)."""

    directory: Path
    index: dict
    target: TargetSpec

    @classmethod
    def open(cls, directory: Path) -> "ShardSet":
        """Read and check the index of a shard folder (one clear error when it is not one)."""
        path = Path(directory) / INDEX
        if not path.is_file():
            raise EdgeMtpError(f"{directory} holds no prepared shards ({INDEX} is missing); run `edge-mtp distill "
                               "prepare` first.")
        try:
            index = json.loads(path.read_text())
            if index.get("format") != FORMAT:
                raise ValueError
            target = target_spec_from_config(json.loads((Path(directory) / TARGET_CONFIG).read_text()))
        except (ValueError, OSError, KeyError, AttributeError):
            raise EdgeMtpError(f"{path} is not a shard index this edge-mtp reads; prepare the shards again.") from None
        for entry in index["shards"]:
            if not (Path(directory) / entry["file"]).is_file():
                raise EdgeMtpError(f"Shard {entry['file']} listed in {path} is missing; prepare the shards again.")
        return cls(Path(directory), index, target)

    def __post_init__(self) -> None:
        self._handles: dict[str, object] = {}
        self._rows: dict[str, list[tuple[str, int]]] = {TRAIN: [], EVAL: []}
        for entry in self.index["shards"]:
            for g, row in zip(entry["sequences"], range(len(entry["sequences"]))):
                rows = self._rows[entry["split"]]
                rows.extend([None] * (g + 1 - len(rows)))
                rows[g] = (entry["file"], row)

    def count(self, split: str) -> int:
        """Number of sequences in a split."""
        return len(self._rows[split])

    def read(self, split: str, numbers: list[int], names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """The records (all, or those in `names`) of sequences `numbers` of `split`, stacked [n, ...]."""
        from safetensors import safe_open

        parts: list[dict[str, torch.Tensor]] = []
        for g in numbers:
            file, row = self._rows[split][g]
            if file not in self._handles:
                self._handles[file] = safe_open(str(self.directory / file), framework="pt")
            h = self._handles[file]
            parts.append({name: h.get_slice(name)[row:row + 1] for name in names or h.keys()})
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    def embeddings(self) -> torch.Tensor:
        """The target's token embedding table [V, H] (memory-mapped)."""
        from safetensors.torch import load_file

        return load_file(str(self.directory / EMBEDDINGS))["weight"]


def write_shard(path: Path, records: dict[str, torch.Tensor]) -> None:
    """One shard file, atomically."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in records.items()}, str(tmp))


def write_json(path: Path, value: dict) -> None:
    """A JSON file, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1))
