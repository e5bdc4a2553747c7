"""Model geometry: target and drafter specs, presets, Hugging Face config.json parsing and the pair check.

Everything else (modules, contract, exporters, runtime) derives shapes from these two dataclasses.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..util.errors import EdgeMtpError, PairMismatchError, UnsupportedModelError
from .locate import checkpoint_files

SLIDING = "sliding"
FULL = "full"
_HF_LAYER_TYPES = {"sliding_attention": SLIDING, "full_attention": FULL}


@dataclass(frozen=True)
class AttentionGeometry:
    """What target and drafter layers have in common: heads, head dims, layer pattern, RoPE."""

    hidden_size: int
    intermediate_size: int
    layer_types: tuple[str, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    global_head_dim: int
    sliding_window: int
    vocab_size: int
    rope_theta_sliding: float = 10_000.0
    rope_theta_full: float = 1_000_000.0
    partial_rotary_full: float = 0.25
    rms_eps: float = 1e-6
    dtype: str = "bfloat16"

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    def layer_head_dim(self, i: int) -> int:
        """Head dim of layer i (full layers use the global head dim)."""
        return self.global_head_dim if self.layer_types[i] == FULL else self.head_dim


@dataclass(frozen=True)
class TargetSpec(AttentionGeometry):
    """Gemma 4 text decoder (E2B/E4B family): PLE, sliding + full layers, KV sharing, softcapped tied head."""

    num_kv_shared_layers: int = 0
    ple_dim: int = 0
    ple_vocab_size: int = 0
    double_wide_mlp: bool = False
    final_softcap: float | None = 30.0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int = 0

    @property
    def first_shared_layer(self) -> int:
        return self.num_layers - self.num_kv_shared_layers

    @property
    def kv_layers(self) -> tuple[int, ...]:
        """Layers with their own K/V projections: one cache pair each."""
        return tuple(range(self.first_shared_layer))

    @property
    def store_layers(self) -> dict[str, int]:
        """Last non-shared layer of each attention type: the caches reuse layers (and the drafter) read."""
        out: dict[str, int] = {}
        for i in self.kv_layers:
            out[self.layer_types[i]] = i
        return out

    def kv_source(self, i: int) -> int:
        """Index of the layer whose cache layer i attends to."""
        return i if i < self.first_shared_layer else self.store_layers[self.layer_types[i]]

    def kv_sharing_mode(self, i: int) -> str | None:
        """'reuse', 'store' or None, as transformers names it."""
        if i >= self.first_shared_layer:
            return "reuse"
        return "store" if i in self.store_layers.values() else None

    def layer_intermediate_size(self, i: int) -> int:
        """MLP width of layer i (double in KV-shared layers when use_double_wide_mlp)."""
        wide = self.double_wide_mlp and i >= self.first_shared_layer
        return self.intermediate_size * (2 if wide else 1)

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Bytes of K plus V per cached token over all cache-owning layers."""
        return sum(2 * self.num_kv_heads * self.layer_head_dim(i) * bytes_per_element for i in self.kv_layers)


@dataclass(frozen=True)
class DrafterSpec(AttentionGeometry):
    """Gemma 4 assistant: pre/post projection around a small all-KV-shared decoder, optional centroid head."""

    backbone_hidden_size: int = 1536
    use_ordered_embeddings: bool = True
    num_centroids: int = 2048
    centroid_top_k: int = 32
    num_assistant_tokens: int = 3

    @property
    def tokens_per_centroid(self) -> int:
        return self.vocab_size // self.num_centroids


def _pattern(unit: list[str], repeats: int) -> tuple[str, ...]:
    return tuple(unit * repeats)


_S, _F = SLIDING, FULL

TARGET_PRESETS: dict[str, TargetSpec] = {
    "e2b": TargetSpec(
        hidden_size=1536, intermediate_size=6144, layer_types=_pattern([_S, _S, _S, _S, _F], 7),
        num_heads=8, num_kv_heads=1, head_dim=256, global_head_dim=512, sliding_window=512,
        vocab_size=262144, num_kv_shared_layers=20, ple_dim=256, ple_vocab_size=262144,
        double_wide_mlp=True, eos_token_ids=(1, 106)),
    "e4b": TargetSpec(
        hidden_size=2560, intermediate_size=10240, layer_types=_pattern([_S, _S, _S, _S, _S, _F], 7),
        num_heads=8, num_kv_heads=2, head_dim=256, global_head_dim=512, sliding_window=512,
        vocab_size=262144, num_kv_shared_layers=18, ple_dim=256, ple_vocab_size=262144,
        double_wide_mlp=False, eos_token_ids=(1, 106)),
    # gemma4.md §5: every feature at toy size (window 4 so short sequences cross it).
    "tiny": TargetSpec(
        hidden_size=64, intermediate_size=128, layer_types=(_S, _S, _F, _S, _S, _F),
        num_heads=4, num_kv_heads=2, head_dim=16, global_head_dim=32, sliding_window=4,
        vocab_size=256, num_kv_shared_layers=3, ple_dim=8, ple_vocab_size=256, double_wide_mlp=True,
        dtype="float32"),
    # A second geometry: one KV head, MQA, 8 layers, wider window, no double-wide MLP.
    "tiny-mqa": TargetSpec(
        hidden_size=48, intermediate_size=96, layer_types=_pattern([_S, _S, _S, _F], 2),
        num_heads=2, num_kv_heads=1, head_dim=24, global_head_dim=48, sliding_window=6,
        vocab_size=320, num_kv_shared_layers=4, ple_dim=4, ple_vocab_size=320, double_wide_mlp=False,
        dtype="float32"),
    # Wide enough that per-step costs are dominated by real matmuls (benchmarks).
    "wide": TargetSpec(
        hidden_size=512, intermediate_size=2048, layer_types=_pattern([_S, _S, _S, _F], 3),
        num_heads=8, num_kv_heads=2, head_dim=64, global_head_dim=128, sliding_window=128,
        vocab_size=8192, num_kv_shared_layers=6, ple_dim=32, ple_vocab_size=8192, double_wide_mlp=True,
        dtype="float32"),
}

DRAFTER_PRESETS: dict[str, DrafterSpec] = {
    "e2b-assistant": DrafterSpec(
        hidden_size=256, intermediate_size=2048, layer_types=(_S, _S, _S, _F), num_heads=4, num_kv_heads=1,
        head_dim=256, global_head_dim=512, sliding_window=512, vocab_size=262144, backbone_hidden_size=1536),
    "e4b-assistant": DrafterSpec(
        hidden_size=256, intermediate_size=2048, layer_types=(_S, _S, _S, _F), num_heads=4, num_kv_heads=2,
        head_dim=256, global_head_dim=512, sliding_window=512, vocab_size=262144, backbone_hidden_size=2560),
    "tiny-assistant": DrafterSpec(
        hidden_size=32, intermediate_size=64, layer_types=(_S, _S, _S, _F), num_heads=4, num_kv_heads=2,
        head_dim=16, global_head_dim=32, sliding_window=4, vocab_size=256, backbone_hidden_size=64,
        num_centroids=16, centroid_top_k=4, dtype="float32"),
    "tiny-mqa-assistant": DrafterSpec(
        hidden_size=24, intermediate_size=48, layer_types=(_S, _S, _S, _F), num_heads=2, num_kv_heads=1,
        head_dim=24, global_head_dim=48, sliding_window=6, vocab_size=320, backbone_hidden_size=48,
        num_centroids=8, centroid_top_k=2, dtype="float32"),
    "wide-assistant": DrafterSpec(
        hidden_size=128, intermediate_size=512, layer_types=(_S, _S, _S, _F), num_heads=4, num_kv_heads=2,
        head_dim=64, global_head_dim=128, sliding_window=128, vocab_size=8192, backbone_hidden_size=512,
        num_centroids=128, centroid_top_k=8, dtype="float32"),
}


def preset_pair(name: str) -> tuple[TargetSpec, DrafterSpec]:
    """Target and assistant specs of a preset name such as 'e2b' or 'tiny'."""
    if name not in TARGET_PRESETS:
        raise EdgeMtpError(f"Unknown preset '{name}'; choose one of: {', '.join(TARGET_PRESETS)}.")
    return TARGET_PRESETS[name], DRAFTER_PRESETS[f"{name}-assistant"]


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face config.json parsing


MAX_DIM = 1 << 24  # no size of a real Gemma 4 comes near this; a larger one is a corrupt config
MAX_LAYERS = 1024
DTYPES = ("bfloat16", "float16", "float32")


def read_config(path: Path) -> dict[str, Any]:
    """Load config.json of a checkpoint directory (or any JSON object file), with a clear error when it is
    missing or malformed. A LoRA adapter directory's config.json is its base's."""
    cfg_path = checkpoint_files(path) / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        raise EdgeMtpError(f"No config.json in {path}: point at a Hugging Face checkpoint directory.")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise EdgeMtpError(f"{cfg_path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    except (UnicodeDecodeError, RecursionError):
        raise EdgeMtpError(f"{cfg_path} is not a UTF-8 JSON text; restore the checkpoint's original file.") from None
    if not isinstance(cfg, dict):
        raise EdgeMtpError(f"{cfg_path} holds a JSON {type(cfg).__name__}, not an object; restore the checkpoint's "
                           "original file.")
    return cfg


def _parsed(build, where: str):
    """Run a spec constructor over untrusted config values; wrong types and missing keys become one clear error."""
    try:
        spec = build()
    except KeyError as e:
        raise EdgeMtpError(f"{where}: required entry {e.args[0]!r} is missing; restore the checkpoint's original "
                           "config.json.") from None
    except (TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
        raise EdgeMtpError(f"{where}: an entry has a value of the wrong type ({e}); restore the checkpoint's "
                           "original config.json.") from None
    check_spec(spec, where)
    return spec


def check_spec(spec: AttentionGeometry, where: str) -> None:
    """Refuse a spec with a wrong-typed or impossible field (from a corrupt config.json or bundle manifest)."""
    def bad(name: str, why: str) -> EdgeMtpError:
        return EdgeMtpError(f"{where}: {name} = {getattr(spec, name)!r} {why}; the file is corrupt or not a Gemma 4 "
                            "configuration.")

    for f in fields(spec):
        value, kind = getattr(spec, f.name), str(f.type)
        if kind == "int" and (type(value) is not int or not 0 <= value <= MAX_DIM):
            raise bad(f.name, f"is not an integer in [0, {MAX_DIM}]")
        if kind.startswith("float") and value is not None and (
                type(value) not in (int, float) or not math.isfinite(value) or value <= 0):
            raise bad(f.name, "is not a positive finite number")
        if kind == "bool" and type(value) is not bool:
            raise bad(f.name, "is not true or false")
    for name in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "global_head_dim",
                 "sliding_window", "vocab_size"):
        if getattr(spec, name) < 1:
            raise bad(name, "must be positive")
    if not (isinstance(spec.layer_types, tuple) and 1 <= len(spec.layer_types) <= MAX_LAYERS
            and set(spec.layer_types) <= {SLIDING, FULL}):
        raise bad("layer_types", f"is not a list of 1 to {MAX_LAYERS} 'sliding'/'full' entries")
    if spec.num_heads % spec.num_kv_heads:
        raise bad("num_heads", f"is not a multiple of num_kv_heads ({spec.num_kv_heads})")
    if spec.dtype not in DTYPES:
        raise bad("dtype", f"is not one of {', '.join(DTYPES)}")
    if spec.partial_rotary_full > 1:
        raise bad("partial_rotary_full", "exceeds 1")
    if isinstance(spec, TargetSpec):
        if spec.num_kv_shared_layers >= spec.num_layers:
            raise bad("num_kv_shared_layers", f"leaves no layer of the {spec.num_layers} with its own cache")
        ids = (spec.bos_token_id, spec.pad_token_id, *spec.eos_token_ids)
        if not all(type(i) is int and 0 <= i < spec.vocab_size for i in ids):
            raise bad("eos_token_ids", f"(with bos {spec.bos_token_id}, pad {spec.pad_token_id}) is not a token id "
                                       f"below vocab_size {spec.vocab_size}")
        if spec.num_kv_shared_layers and set(spec.store_layers) != set(spec.layer_types):
            raise UnsupportedModelError(f"{where}: the KV-shared layers use an attention type that no earlier layer "
                                        "stores.")
        if spec.ple_dim and spec.ple_vocab_size != spec.vocab_size:
            raise UnsupportedModelError(f"{where}: vocab_size_per_layer_input ({spec.ple_vocab_size}) differs from "
                                        f"vocab_size ({spec.vocab_size}); not supported.")
    if isinstance(spec, DrafterSpec):
        for name in ("backbone_hidden_size", "num_centroids", "centroid_top_k", "num_assistant_tokens"):
            if getattr(spec, name) < 1:
                raise bad(name, "must be positive")
        if spec.use_ordered_embeddings and spec.centroid_top_k > spec.num_centroids:
            raise bad("centroid_top_k", f"exceeds num_centroids ({spec.num_centroids})")


def _text_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    model_type = cfg.get("model_type")
    if model_type == "gemma4":
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise EdgeMtpError(f"{where}: a 'gemma4' config needs a 'text_config' section.")
        return text
    if model_type == "gemma4_text":
        return cfg
    raise UnsupportedModelError(
        f"{where}: model_type '{model_type}' is not a Gemma 4 text model; edge-mtp exports gemma4 / gemma4_text "
        "targets (E2B, E4B) and gemma4_assistant drafters.")


def _refuse_unsupported(text: dict[str, Any], where: str) -> None:
    if text.get("enable_moe_block"):
        raise UnsupportedModelError(f"{where}: Mixture-of-Experts Gemma 4 (26B-A4B) is not supported yet; "
                                    "use an E2B or E4B checkpoint.")
    if text.get("attention_k_eq_v"):
        raise UnsupportedModelError(f"{where}: Gemma 4 with shared K=V attention (31B) is not supported yet; "
                                    "use an E2B or E4B checkpoint.")
    if text.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{where}: bidirectional attention is not supported for export.")
    if text.get("attention_bias"):
        raise UnsupportedModelError(f"{where}: attention_bias=true is not a Gemma 4 configuration we support.")
    act = text.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise UnsupportedModelError(f"{where}: hidden_activation '{act}' is not supported (expected gelu_pytorch_tanh).")
    if text.get("tie_word_embeddings", True) is False:
        raise UnsupportedModelError(f"{where}: untied output embeddings are not supported (Gemma 4 ties them).")


def _geometry(text: dict[str, Any], where: str, dtype: str) -> dict[str, Any]:
    n = int(text.get("num_hidden_layers", 30))
    if not 1 <= n <= MAX_LAYERS:
        raise EdgeMtpError(f"{where}: num_hidden_layers {n} is not between 1 and {MAX_LAYERS}.")
    raw_types = text.get("layer_types") or [
        "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
    try:
        layer_types = tuple(_HF_LAYER_TYPES[t] for t in raw_types)
    except KeyError as e:
        raise UnsupportedModelError(f"{where}: unknown layer type {e.args[0]!r} in layer_types.") from None
    if len(layer_types) != n:
        raise EdgeMtpError(f"{where}: layer_types has {len(layer_types)} entries but num_hidden_layers is {n}.")
    head_dim = int(text.get("head_dim", 256))
    global_head_dim = text.get("global_head_dim")
    if global_head_dim is None:  # transformers serialises it as per-layer overrides of the full layers
        per_layer = text.get("per_layer_config") or {}
        full_dims = {int(v.get("head_dim", head_dim)) for k, v in per_layer.items()
                     if layer_types[int(k)] == FULL}
        global_head_dim = full_dims.pop() if len(full_dims) == 1 else 512
    rope = text.get("rope_parameters") or {}
    sliding_rope = rope.get("sliding_attention") or {"rope_type": "default", "rope_theta": 10_000.0}
    full_rope = rope.get("full_attention") or {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                               "rope_theta": 1_000_000.0}
    if sliding_rope.get("rope_type", "default") != "default" or full_rope.get("rope_type") not in ("proportional", "default"):
        raise UnsupportedModelError(f"{where}: RoPE types {sliding_rope.get('rope_type')}/{full_rope.get('rope_type')} "
                                    "are not supported (expected default/proportional).")
    partial = float(full_rope.get("partial_rotary_factor", 1.0)) if full_rope.get("rope_type") == "proportional" else 1.0
    return dict(
        hidden_size=int(text["hidden_size"]), intermediate_size=int(text["intermediate_size"]),
        layer_types=layer_types, num_heads=int(text["num_attention_heads"]),
        num_kv_heads=int(text["num_key_value_heads"]), head_dim=head_dim, global_head_dim=int(global_head_dim),
        sliding_window=int(text.get("sliding_window", 512)), vocab_size=int(text["vocab_size"]),
        rope_theta_sliding=float(sliding_rope.get("rope_theta", 10_000.0)),
        rope_theta_full=float(full_rope.get("rope_theta", 1_000_000.0)), partial_rotary_full=partial,
        rms_eps=float(text.get("rms_norm_eps", 1e-6)), dtype=dtype)


def _dtype(cfg: dict[str, Any], text: dict[str, Any]) -> str:
    return str(text.get("dtype") or text.get("torch_dtype") or cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, list) else [value]))


def target_spec_from_config(cfg: dict[str, Any], where: str = "config.json") -> TargetSpec:
    """TargetSpec from a gemma4 (multimodal wrapper) or gemma4_text config.json dictionary."""
    return _parsed(lambda: _target_spec(cfg, where), where)


def _target_spec(cfg: dict[str, Any], where: str) -> TargetSpec:
    text = _text_config(cfg, where)
    _refuse_unsupported(text, where)
    geo = _geometry(text, where, _dtype(cfg, text))
    if geo["layer_types"][-1] != FULL:
        raise UnsupportedModelError(f"{where}: the last layer must be full attention (Gemma 4 requires it).")
    spec = TargetSpec(
        **geo, num_kv_shared_layers=int(text.get("num_kv_shared_layers", 0)),
        ple_dim=int(text.get("hidden_size_per_layer_input", 0)),
        ple_vocab_size=int(text.get("vocab_size_per_layer_input", 0)),
        double_wide_mlp=bool(text.get("use_double_wide_mlp", False)),
        final_softcap=text.get("final_logit_softcapping"),
        bos_token_id=int(text.get("bos_token_id", cfg.get("bos_token_id", 2)) or 2),
        eos_token_ids=_ids(text.get("eos_token_id", cfg.get("eos_token_id", 1))) or (1,),
        pad_token_id=int(text.get("pad_token_id", 0) or 0))
    return spec


def max_positions(cfg: dict[str, Any], where: str = "config.json") -> int | None:
    """The longest sequence a target config supports (max_position_embeddings; None where it does not say)."""
    value = _text_config(cfg, where).get("max_position_embeddings")
    return value if type(value) is int and value > 0 else None


def drafter_spec_from_config(cfg: dict[str, Any], generation: dict[str, Any] | None = None,
                             where: str = "config.json") -> DrafterSpec:
    """DrafterSpec from a gemma4_assistant config.json (and optionally its generation_config.json)."""
    return _parsed(lambda: _drafter_spec(cfg, generation, where), where)


def _drafter_spec(cfg: dict[str, Any], generation: dict[str, Any] | None, where: str) -> DrafterSpec:
    if cfg.get("model_type") != "gemma4_assistant":
        raise UnsupportedModelError(
            f"{where}: model_type '{cfg.get('model_type')}' is not a Gemma 4 assistant (expected gemma4_assistant).")
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise EdgeMtpError(f"{where}: a gemma4_assistant config needs a 'text_config' section.")
    _refuse_unsupported(text, where)
    if text.get("hidden_size_per_layer_input") or text.get("use_double_wide_mlp"):
        raise UnsupportedModelError(f"{where}: assistant layers must have no PLE and no double-wide MLP.")
    n = int(text.get("num_hidden_layers", 4))
    shared = text.get("num_kv_shared_layers") or n
    if shared != n:
        raise UnsupportedModelError(f"{where}: every assistant layer must share the target's KV "
                                    f"(num_kv_shared_layers {shared} != {n}).")
    gen = generation or {}
    return DrafterSpec(
        **_geometry(text, where, _dtype(cfg, text)),
        backbone_hidden_size=int(cfg.get("backbone_hidden_size", 1536)),
        use_ordered_embeddings=bool(cfg.get("use_ordered_embeddings", False)),
        num_centroids=int(cfg.get("num_centroids", 2048)),
        centroid_top_k=int(cfg.get("centroid_intermediate_top_k", 32)),
        num_assistant_tokens=int(gen.get("num_assistant_tokens", 3) or 3))


def check_pair(target: TargetSpec, drafter: DrafterSpec) -> None:
    """Raise PairMismatchError unless the assistant reads this target's caches and embeddings correctly."""
    checks = [
        ("backbone width", drafter.backbone_hidden_size, target.hidden_size),
        ("KV heads", drafter.num_kv_heads, target.num_kv_heads),
        ("sliding head dim", drafter.head_dim, target.head_dim),
        ("full head dim", drafter.global_head_dim, target.global_head_dim),
        ("sliding window", drafter.sliding_window, target.sliding_window),
        ("vocabulary size", drafter.vocab_size, target.vocab_size),
    ]
    for what, got, want in checks:
        if got != want:
            raise PairMismatchError(
                f"The assistant does not belong to this target: its {what} is {got} but the target's is {want}; "
                "use the assistant released (or distilled) for this target.")
    if set(drafter.layer_types) - set(target.store_layers):
        raise PairMismatchError("The assistant has an attention type that the target stores no cache for.")
    if drafter.use_ordered_embeddings and drafter.vocab_size % drafter.num_centroids:
        raise PairMismatchError(f"The assistant's vocabulary ({drafter.vocab_size}) is not divisible by its "
                                f"{drafter.num_centroids} centroids.")


def spec_to_dict(spec: AttentionGeometry) -> dict[str, Any]:
    """JSON-friendly dictionary of a spec (for manifests and --json output)."""
    return asdict(spec)


def spec_from_dict(cls: type, data: dict[str, Any], where: str = "manifest"):
    """Rebuild a TargetSpec or DrafterSpec from spec_to_dict output (as stored in bundle manifests), checked."""
    if not isinstance(data, dict):
        raise EdgeMtpError(f"{where}: the {cls.__name__} entry is not an object; re-export the bundle.")
    try:
        spec = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    except TypeError as e:
        raise EdgeMtpError(f"{where}: the {cls.__name__} entry does not match this edge-mtp ({e}); re-export the "
                           "bundle.") from None
    check_spec(spec, where)
    return spec


def with_dtype(spec, dtype: str):
    """Copy of a spec with another storage dtype."""
    return replace(spec, dtype=dtype)


__all__ = ["SLIDING", "FULL", "TargetSpec", "DrafterSpec", "TARGET_PRESETS", "DRAFTER_PRESETS", "preset_pair",
           "read_config", "check_spec", "target_spec_from_config", "drafter_spec_from_config", "check_pair", "spec_to_dict", "spec_from_dict",
           "with_dtype"]
