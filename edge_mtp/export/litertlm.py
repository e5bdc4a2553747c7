"""The .litertlm container: writing it with litert-lm-builder, and reading its header and TFLite sections back."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..contract import DRAFTER, EMBEDDER, PER_LAYER_EMBEDDER, TARGET, Contract, k_name, v_name
from ..errors import EdgeMtpError

MAGIC = b"LITERTLM"
MODEL_TYPES = {TARGET: "PREFILL_DECODE", EMBEDDER: "EMBEDDER", PER_LAYER_EMBEDDER: "PER_LAYER_EMBEDDER",
               DRAFTER: "MTP_DRAFTER"}
SECTION_TYPES = {3: "tflite_model", 4: "sp_tokenizer", 5: "llm_metadata", 6: "hf_tokenizer", 7: "tflite_weights",
                 9: "executor_metadata"}
MANIFEST_KEY = "edge_mtp_manifest"


@dataclass
class BundleMetadata:
    """What LiteRT-LM's LlmMetadata needs from the checkpoint."""

    start_token: int
    stop_tokens: list[int]
    chat_template: str | None = None


def _llm_metadata(meta: BundleMetadata, contract: Contract) -> bytes:
    from litert_lm_builder.runtime.proto import llm_metadata_pb2

    md = llm_metadata_pb2.LlmMetadata()
    md.start_token.token_ids.ids.append(meta.start_token)
    for token in meta.stop_tokens:
        md.stop_tokens.add().token_ids.ids.append(token)
    md.max_num_tokens = contract.context
    md.llm_model_type.gemma4.SetInParent()
    if meta.chat_template:
        md.jinja_prompt_template = meta.chat_template
    # No sampler_params: LiteRT-LM 0.18.1 rejects every sampler type it names at the first decode.
    return md.SerializeToString()


def _executor_metadata(contract: Contract) -> bytes:
    from litert_lm_builder.runtime.proto import executor_metadata_pb2 as em

    meta = em.ExecutorMetadata()
    llm = meta.llm_executor_metadata
    llm.max_history_size = contract.context
    t = contract.target
    for layer in t.kv_layers:
        sliding = t.layer_types[layer] == "sliding"
        for name, axis, kind in ((k_name(layer), 2, "KEY"), (v_name(layer), 3, "VALUE")):
            buf = llm.state_buffers.add()
            buf.prefill_input_name = buf.prefill_output_name = name
            buf.decode_input_name = buf.decode_output_name = name
            buf.type = getattr(em.StateBuffer, f"TYPE_{'LOCAL' if sliding else 'GLOBAL'}_{kind}_CACHE")
            buf.sequence_axis = axis
    llm.attention_mask_settings.attention_mask_type = em.ATTENTION_MASK_TYPE_CAUSAL
    return meta.SerializeToString()


def write_litertlm(out: Path, models: dict[str, Path], contract: Contract, tokenizer_json: Path,
                   meta: BundleMetadata, manifest: dict[str, Any], workdir: Path) -> None:
    """Assemble the bundle at `out` (the caller makes it atomic): metadata, tokenizer, the TFLite models."""
    from litert_lm_builder import litertlm_builder as lb

    builder = lb.LitertLmFileBuilder()
    builder.add_system_metadata(lb.Metadata(key="Authors", value="edge-mtp", dtype=lb.DType.STRING))
    builder.add_system_metadata(lb.Metadata(key=MANIFEST_KEY, value=json.dumps(manifest, separators=(",", ":")),
                                            dtype=lb.DType.STRING))
    (workdir / "llm_metadata.pb").write_bytes(_llm_metadata(meta, contract))
    (workdir / "executor_metadata.pb").write_bytes(_executor_metadata(contract))
    builder.add_llm_metadata(str(workdir / "llm_metadata.pb"), supports_thinking=False,
                             supports_function_calling=False)
    builder.add_hf_tokenizer(str(tokenizer_json))
    for name, path in models.items():
        builder.add_tflite_model(str(path), getattr(lb.TfLiteModelType, MODEL_TYPES[name]))
    builder.add_executor_metadata(str(workdir / "executor_metadata.pb"))
    with open(out, "wb") as f:
        builder.build(f, validate_metadata=True)


# -------------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class Section:
    """One section of a bundle: its data type, byte range and key/value items."""

    data_type: str
    begin: int
    end: int
    items: dict[str, Any] = field(default_factory=dict)

    @property
    def model_type(self) -> str | None:
        return self.items.get("model_type")


@dataclass
class LitertlmFile:
    """The parsed header of a .litertlm file."""

    path: Path
    version: tuple[int, int, int]
    system: dict[str, Any]
    sections: list[Section]

    def model_section(self, model_type: str) -> Section | None:
        """The TFLite section of a model type such as 'tf_lite_mtp_drafter'."""
        return next((s for s in self.sections if s.model_type == model_type), None)

    def read(self, section: Section) -> bytes:
        """The raw bytes of a section."""
        with open(self.path, "rb") as f:
            f.seek(section.begin)
            return f.read(section.end - section.begin)

    @property
    def manifest(self) -> dict[str, Any]:
        raw = self.system.get(MANIFEST_KEY)
        return json.loads(raw) if raw else {}


def _value(item) -> Any:
    from litert_lm_builder import litertlm_header_schema_py_generated as schema

    table = item.Value()
    if table is None:
        return None
    kinds = {schema.VData.StringValue: schema.StringValue, schema.VData.Int32: schema.Int32,
             schema.VData.Int64: schema.Int64, schema.VData.UInt8: schema.UInt8, schema.VData.Bool: schema.Bool,
             schema.VData.Float32: schema.Float32}
    cls = kinds.get(item.ValueType())
    if cls is None:
        return None
    obj = cls()
    obj.Init(table.Bytes, table.Pos)
    value = obj.Value()
    return value.decode() if isinstance(value, bytes) else value


def _items(obj) -> dict[str, Any]:
    out = {}
    for j in range(obj.ItemsLength() if hasattr(obj, "ItemsLength") else obj.EntriesLength()):
        item = obj.Items(j) if hasattr(obj, "Items") else obj.Entries(j)
        if item is not None and item.Key() is not None:
            out[item.Key().decode()] = _value(item)
    return out


def read_litertlm(path: Path) -> LitertlmFile:
    """Parse a bundle's header; a truncated or foreign file gets one clear error."""
    from litert_lm_builder import litertlm_header_schema_py_generated as schema

    path = Path(path)
    if not path.is_file():
        raise EdgeMtpError(f"Bundle {path} does not exist.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(32)
        if len(head) < 32 or head[:8] != MAGIC:
            raise EdgeMtpError(f"{path} is not a .litertlm bundle (bad magic bytes); re-export it.")
        version = struct.unpack("<III", head[8:20])
        header_end = struct.unpack("<Q", head[24:32])[0]
        if not 32 < header_end <= size:
            raise EdgeMtpError(f"{path} is truncated or corrupt (header ends at byte {header_end} of {size}).")
        data = f.read(header_end - 32)
    try:
        root = schema.LiteRTLMMetaData.GetRootAs(data, 0)
        system = _items(root.SystemMetadata()) if root.SystemMetadata() is not None else {}
        sections_meta = root.SectionMetadata()
        sections = []
        for i in range(sections_meta.ObjectsLength()):
            obj = sections_meta.Objects(i)
            sections.append(Section(SECTION_TYPES.get(obj.DataType(), str(obj.DataType())), obj.BeginOffset(),
                                    obj.EndOffset(), _items(obj)))
    except Exception:
        raise EdgeMtpError(f"{path} has a corrupt header; re-export the bundle.") from None
    for s in sections:
        if s.end > size or s.begin > s.end:
            raise EdgeMtpError(f"{path} is truncated: section {s.model_type or s.data_type} ends at byte {s.end} "
                               f"but the file has {size} bytes; re-export or re-copy it.")
    return LitertlmFile(path, version, system, sections)
