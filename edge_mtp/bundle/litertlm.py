"""The .litertlm container: writing it with litert-lm-builder, and reading its header and TFLite sections back."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import struct
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..model.contract import DRAFTER, EMBEDDER, PER_LAYER_EMBEDDER, TARGET, Contract, k_name, v_name
from ..util.errors import EdgeMtpError
from .manifest import check_format_version, file_blocks, sha256_file

MAGIC = b"LITERTLM"
MODEL_TYPES = {TARGET: "PREFILL_DECODE", EMBEDDER: "EMBEDDER", PER_LAYER_EMBEDDER: "PER_LAYER_EMBEDDER",
               DRAFTER: "MTP_DRAFTER"}
SECTION_MODEL_TYPES = {name: f"tf_lite_{kind.lower()}" for name, kind in MODEL_TYPES.items()}  # as read back
SECTION_TYPES = {3: "tflite_model", 4: "sp_tokenizer", 5: "llm_metadata", 6: "hf_tokenizer", 7: "tflite_weights",
                 9: "executor_metadata"}
MANIFEST_KEY = "edge_mtp_manifest"
MANIFEST_FORMAT, MANIFEST_VERSION = "edge-mtp-litertlm", 1
CONTAINER_MAJOR = 1  # the .litertlm major version LiteRT-LM 0.18 reads
HEADER_READ = 16 * 1024  # bytes of a .litertlm header LiteRT-LM 0.18.1 reads ("Failed to read header data" past it)
SECTIONS_KEY = "sections"  # manifest entry: type, model type, size and sha256 of every section, in file order
MAX_SECTIONS, MAX_ITEMS = 256, 1024  # far above any real bundle; a header claiming more is corrupt
MAX_TOKENIZER_BYTES = 1 << 30
SOURCE_PATTERNS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja", "*.safetensors", "*.safetensors.index.json")  # what an export reads


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
    md.supports_thinking = md.supports_function_calling = False
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
            # in place (param_tensor) LiteRT-LM binds LOCAL caches as prefill inputs, which its GPU delegate refuses
            local = sliding and not contract.param_tensor
            buf.type = getattr(em.StateBuffer, f"TYPE_{'LOCAL' if local else 'GLOBAL'}_{kind}_CACHE")
            buf.sequence_axis = axis
            if local and contract.ring_size:  # a ring: holds the window (minimum) in ring_size slots (maximum)
                buf.minimum_sequence_length = t.sliding_window
                buf.maximum_sequence_length = contract.ring_size
    masks = llm.attention_mask_settings
    masks.attention_mask_type = em.ATTENTION_MASK_TYPE_CAUSAL
    if contract.ring_size:
        # LiteRT-LM fills a local mask only for an input named local_mask (or its aliases), which our graphs do not
        # take: they mask ring slots from input_pos and the global mask (layers.KeyView.ring)
        masks.local_attention_mask_type = em.ATTENTION_MASK_TYPE_CAUSAL
        masks.sliding_window_size = t.sliding_window
    return meta.SerializeToString()


def write_litertlm(out: Path, models: dict[str, Path], contract: Contract, tokenizer_json: Path,
                   meta: BundleMetadata, manifest: dict[str, Any], workdir: Path) -> None:
    """Assemble the bundle at `out` (the caller makes it atomic): metadata, tokenizer, the TFLite models.

    Every section is first written to a file holding its exact bytes in the bundle, so the manifest can record
    each section's sha256 (verified by read_litertlm(verify=True)).
    """
    from litert_lm_builder import litertlm_builder as lb

    llm, executor = workdir / "llm_metadata.pb", workdir / "executor_metadata.pb"
    llm.write_bytes(_llm_metadata(meta, contract))
    executor.write_bytes(_executor_metadata(contract))
    tokenizer = workdir / "tokenizer.json.zlib"  # the section's own encoding: 8-byte length, then zlib
    text = Path(tokenizer_json).read_bytes()
    tokenizer.write_bytes(len(text).to_bytes(8, "little") + zlib.compress(text))
    order = [("llm_metadata", None, llm), ("hf_tokenizer", None, tokenizer)]
    models = {name: Path(models[name]) for name in sorted(models, key=lambda n: (n != EMBEDDER, n != TARGET))}
    shared = _share_tied_table(models, workdir)  # the embedder, then the target: it may read the target's bytes
    types = {name: getattr(lb.TfLiteModelType, MODEL_TYPES[name]) for name in models}
    order += [("tflite_model", types[name].value, path) for name, path in models.items()]
    order.append(("executor_metadata", None, executor))
    sections = [{"type": kind, "model_type": model_type, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
                for kind, model_type, path in order]
    if shared is not None:
        embedder = next(i for i, (_, _, path) in enumerate(order) if path == models[EMBEDDER])
        sections[embedder].update(bytes=shared.span, sha256=shared.sha256())
    builder = lb.LitertLmFileBuilder()
    builder.add_system_metadata(lb.Metadata(key="Authors", value="edge-mtp", dtype=lb.DType.STRING))
    builder.add_system_metadata(lb.Metadata(key=MANIFEST_KEY, dtype=lb.DType.STRING, value=json.dumps(
        {**manifest, SECTIONS_KEY: sections}, separators=(",", ":"))))
    builder.add_llm_metadata(str(llm))
    builder.add_hf_tokenizer(str(tokenizer))
    for name, path in models.items():
        builder.add_tflite_model(str(path), types[name])
    builder.add_executor_metadata(str(executor))
    with open(out, "wb") as f, _stable_header(sections, manifest):
        builder.build(f, validate_metadata=True)
    with open(out, "rb") as f:
        header_end = struct.unpack("<Q", f.read(32)[24:32])[0]
    if header_end > HEADER_READ:
        raise EdgeMtpError(f"internal: the bundle's header (with its manifest) takes {header_end} bytes, more than the "
                           f"{HEADER_READ} LiteRT-LM reads; please report it with the checkpoint's config.json.")
    if shared is not None:
        _extend_section(out, embedder, shared)


@dataclass
class _SharedTable:
    """The embedder's table stored once: its section runs on into the target's, up to the end of the tied LM head's
    table, which the embedder model reads there (formats.tflite.detach_buffer)."""

    embedder: Path  # the embedder model without its table
    target: Path
    offset: int  # of the table in the target model
    size: int

    @property
    def gap(self) -> int:
        """Bytes from the embedder section's start to the target section's."""
        return _block_aligned(self.embedder.stat().st_size)

    @property
    def span(self) -> int:
        return self.gap + self.offset + self.size

    def sha256(self) -> str:
        """The embedder section's sha256, as read_litertlm(verify=True) will hash it."""
        digest = hashlib.sha256(self.embedder.read_bytes())
        digest.update(b"\0" * (self.gap - self.embedder.stat().st_size))
        for block in file_blocks(self.target, 0, self.offset + self.size):
            digest.update(block)
        return digest.hexdigest()


def _share_tied_table(models: dict[str, Path], workdir: Path) -> _SharedTable | None:
    """Point the embedder at the LM head's copy of the tied table when the two are byte-identical (quantized
    exports, export.driver), replacing models[EMBEDDER] by the embedder without its table; None otherwise."""
    from ..formats.tflite import detach_buffer, shared_buffer

    if EMBEDDER not in models or TARGET not in models:
        return None
    try:
        found = shared_buffer(models[EMBEDDER], models[TARGET])
    except EdgeMtpError:  # not TFLite models (test seeds of the container): nothing to share
        return None
    if found is None:
        return None
    buffer, offset, size = found
    detached = workdir / "embedder.shared.tflite"
    shared = _SharedTable(detached, models[TARGET], offset, size)
    detach_buffer(models[EMBEDDER], buffer, detached, place=lambda n: _block_aligned(n) + offset)
    models[EMBEDDER] = detached
    return shared


def _block_aligned(n: int) -> int:
    """`n` rounded up to the container's section alignment (where the builder starts the next section)."""
    from litert_lm_builder import litertlm_core

    return n + (-n % litertlm_core.BLOCK_SIZE)


def _extend_section(path: Path, index: int, shared: _SharedTable) -> None:
    """Set a written section's end offset in the header to cover the shared table (LiteRT-LM maps each section's
    range on its own, so ranges may overlap)."""
    from litert_lm_builder import litertlm_header_schema_py_generated as schema

    with open(path, "r+b") as f:
        header_end = struct.unpack("<Q", f.read(32)[24:32])[0]
        header = bytearray(f.read(header_end - 32))
        sections = schema.LiteRTLMMetaData.GetRootAs(header, 0).SectionMetadata()
        section, following = sections.Objects(index), sections.Objects(index + 1)
        if following.BeginOffset() != section.BeginOffset() + shared.gap:
            raise EdgeMtpError("internal: the target section does not follow the embedder's where expected")
        field = section._tab.Offset(8)  # end_offset (SectionObject field 2), always present: the builder packs it
        struct.pack_into("<Q", header, section._tab.Pos + field, section.BeginOffset() + shared.span)
        f.seek(32)
        f.write(header)


def source_files(directory: Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint directory that an export reads, by file name."""
    files = sorted({p for pattern in SOURCE_PATTERNS for p in Path(directory).glob(pattern) if p.is_file()})
    return {p.name: sha256_file(p) for p in files}


@contextmanager
def _stable_header(sections: list[dict], manifest: dict[str, Any]) -> Iterator[None]:
    """Make the builder's header reproducible: its uuid derives from the sections' and the manifest's content, and
    its creation time is SOURCE_DATE_EPOCH (the reproducible-builds convention) or the newest source file's mtime.

    The builder replaces both with uuid4() and now() on every build; its one helper doing so is swapped meanwhile.
    """
    from litert_lm_builder import litertlm_builder as lb

    digest = hashlib.sha256(json.dumps([sections, manifest], sort_keys=True).encode()).digest()
    stamp = datetime.datetime.fromtimestamp(_source_epoch(manifest), datetime.timezone.utc).isoformat()
    fixed = [lb.Metadata(key="uuid", value=str(uuid.UUID(bytes=digest[:16], version=4)), dtype=lb.DType.STRING),
             lb.Metadata(key="creation_timestamp", value=stamp, dtype=lb.DType.STRING)]
    original = lb.populate_system_metadata
    lb.populate_system_metadata = lambda metadata: [m for m in metadata if m.key not in ("uuid", "creation_timestamp")] \
        + fixed
    try:
        yield
    finally:
        lb.populate_system_metadata = original


def _source_epoch(manifest: dict[str, Any]) -> int:
    """SOURCE_DATE_EPOCH if set, else the newest mtime of the source files the manifest names (0 without any)."""
    if os.environ.get("SOURCE_DATE_EPOCH", "").isdigit():
        return int(os.environ["SOURCE_DATE_EPOCH"])
    source = manifest.get("source") or {}
    times = [(Path(source[role]) / name).stat().st_mtime for role, files in (source.get("sha256") or {}).items()
             for name in files or () if isinstance(source.get(role), str) and (Path(source[role]) / name).is_file()]
    return int(max(times, default=0))


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
    manifest: dict[str, Any] = field(default_factory=dict)  # edge-mtp's manifest ({} in foreign bundles)

    def model_section(self, model_type: str) -> Section | None:
        """The TFLite section of a model type such as 'tf_lite_mtp_drafter'."""
        return next((s for s in self.sections if s.model_type == model_type), None)

    def section(self, data_type: str) -> Section | None:
        """The first section of a data type such as 'hf_tokenizer'."""
        return next((s for s in self.sections if s.data_type == data_type), None)

    def read(self, section: Section) -> bytes:
        """The raw bytes of a section."""
        with open(self.path, "rb") as f:
            f.seek(section.begin)
            return f.read(section.end - section.begin)

    def extract(self, section: Section, out: Path) -> None:
        """Copy a section's bytes into a file of their own, streamed."""
        with open(out, "wb") as o:
            for block in file_blocks(self.path, section.begin, section.end):
                o.write(block)
            if o.tell() != section.end - section.begin:
                raise EdgeMtpError(f"{self.path} is truncated inside its {section.model_type} section; re-copy "
                                   "or re-export it.")

    def tokenizer_json(self) -> str:
        """The Hugging Face tokenizer.json text stored (zlib-compressed, length-prefixed) in the bundle."""
        section = self.section("hf_tokenizer")
        if section is None:
            raise EdgeMtpError(f"{self.path} has no Hugging Face tokenizer section; re-export it.")
        raw = self.read(section)
        size = int.from_bytes(raw[:8], "little")
        try:
            if len(raw) < 8 or size > MAX_TOKENIZER_BYTES:
                raise ValueError
            inflater = zlib.decompressobj()
            text = inflater.decompress(raw[8:], size + 1)
            if len(text) != size or not inflater.eof:
                raise ValueError
            return text.decode()
        except (ValueError, zlib.error, UnicodeDecodeError):
            raise EdgeMtpError(f"{self.path}: the tokenizer section is corrupt; re-copy or re-export the bundle.") \
                from None

    def verify(self) -> None:
        """Check every section against the size and sha256 the manifest recorded at export (if it recorded them)."""
        recorded = self.manifest.get(SECTIONS_KEY)
        if recorded is None:  # written before edge-mtp recorded section hashes: nothing to check against
            return
        if not isinstance(recorded, list) or len(recorded) != len(self.sections):
            raise EdgeMtpError(f"{self.path} has {len(self.sections)} sections but its manifest records "
                               f"{len(recorded) if isinstance(recorded, list) else 'none'}; the bundle is corrupt, "
                               "re-copy or re-export it.")
        for i, (s, want) in enumerate(zip(self.sections, recorded)):
            name = s.model_type or s.data_type
            if not isinstance(want, dict) or (want.get("type"), want.get("model_type")) != (s.data_type, s.model_type):
                raise EdgeMtpError(f"{self.path}: section {i} is {name} but the manifest records "
                                   f"{want.get('model_type') or want.get('type') if isinstance(want, dict) else want!r}; "
                                   "the bundle is corrupt, re-copy or re-export it.")
            if want.get("bytes") != s.end - s.begin or want.get("sha256") != sha256_file(self.path, s.begin, s.end):
                raise EdgeMtpError(f"{self.path}: the {name} section does not match the size and sha256 recorded at "
                                   "export; the bundle is corrupted or truncated, re-copy or re-export it.")


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
    count = obj.ItemsLength() if hasattr(obj, "ItemsLength") else obj.EntriesLength()
    if count > MAX_ITEMS:
        raise ValueError(f"{count} metadata items")
    for j in range(count):
        item = obj.Items(j) if hasattr(obj, "Items") else obj.Entries(j)
        if item is not None and item.Key() is not None:
            out[item.Key().decode()] = _value(item)
    return out


def _manifest(system: dict[str, Any], path: Path) -> dict[str, Any]:
    """edge-mtp's manifest from the system metadata, after its format and version check ({} if absent)."""
    raw = system.get(MANIFEST_KEY)
    if raw is None:
        return {}
    try:
        manifest = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict):
        raise EdgeMtpError(f"{path} has a corrupt edge-mtp manifest; re-copy or re-export the bundle.")
    check_format_version(manifest.get("format_version", 1), str(path), MANIFEST_VERSION)
    return manifest


def read_litertlm(path: Path, verify: bool = False) -> LitertlmFile:
    """Parse a bundle's header (and with `verify` check every section's sha256); bad files get one clear error."""
    from litert_lm_builder import litertlm_header_schema_py_generated as schema

    path = Path(path)
    if not path.is_file():
        raise EdgeMtpError(f"Bundle {path} does not exist." if not path.exists() else
                           f"{path} is not a file; pass a .litertlm bundle.")
    try:
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
    except OSError as e:
        raise EdgeMtpError(f"Cannot read {path}: {e.strerror}.") from None
    if version[0] != CONTAINER_MAJOR:
        raise EdgeMtpError(f"{path} is a LiteRT-LM container of version {'.'.join(map(str, version))}; this edge-mtp "
                           f"reads version {CONTAINER_MAJOR}.x (re-export the bundle, or upgrade edge-mtp).")
    try:
        root = schema.LiteRTLMMetaData.GetRootAs(data, 0)
        system = _items(root.SystemMetadata()) if root.SystemMetadata() is not None else {}
        sections_meta = root.SectionMetadata()
        count = sections_meta.ObjectsLength()
        if count > MAX_SECTIONS:
            raise ValueError(f"{count} sections")
        sections = []
        for i in range(count):
            obj = sections_meta.Objects(i)
            sections.append(Section(SECTION_TYPES.get(obj.DataType(), str(obj.DataType())), obj.BeginOffset(),
                                    obj.EndOffset(), _items(obj)))
    except Exception:  # the generated flatbuffer code raises anything from IndexError to UnicodeDecodeError
        raise EdgeMtpError(f"{path} has a corrupt header; re-copy or re-export the bundle.") from None
    for s in sections:
        if s.end > size or s.begin > s.end or s.begin < header_end:
            raise EdgeMtpError(f"{path} is truncated or corrupt: section {s.model_type or s.data_type} spans bytes "
                               f"{s.begin}-{s.end} but the file has {size} bytes and its header ends at {header_end}; "
                               "re-copy or re-export it.")
    bundle = LitertlmFile(path, version, system, sections, _manifest(system, path))
    if verify:
        bundle.verify()
    return bundle
