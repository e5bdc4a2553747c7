#!/usr/bin/env python3
"""Writes the tiny `.litertlm` fixture of spec-core's reader tests, and its expected description.

Usage (needs `pip install litert-lm-builder==0.18.1`, which brings `flatbuffers` and `protobuf`):

    python make_test_bundle.py                      # writes test_bundle.litertlm + test_bundle.expected.json here
    python make_test_bundle.py --describe B.litertlm  # only writes test_bundle.expected.json describing bundle B

The Kotlin tests (LitertlmReaderTest) parse `test_bundle.litertlm` with spec-core's hand-written reader
and compare every section, item and system-metadata entry with `test_bundle.expected.json`, which this
script produces with the builder's own generated FlatBuffers/protobuf code: two independent readers
must agree. To swap in a real bundle (e.g. one written by `edge-mtp export`), copy it over
`test_bundle.litertlm` and run `--describe` on it; the tests only assume that the bundle carries an
LlmMetadata section and prefill_decode, embedder and mtp_drafter models.

The fixture built here is not runnable: its three TFLite sections are minimal valid TFLite FlatBuffers
(identifier `TFL3`, schema version 3, a description, no subgraphs); the builder does not validate
models. Sections sit on 16 KiB boundaries, so the five sections give a file of about 80 KB.
"""

import argparse
import json
import pathlib
import struct
import sys
import tempfile

import flatbuffers
from litert_lm_builder import litertlm_builder as lb
from litert_lm_builder import litertlm_header_schema_py_generated as schema
from litert_lm_builder.runtime.proto import llm_metadata_pb2

HERE = pathlib.Path(__file__).resolve().parent
BUNDLE = HERE / "test_bundle.litertlm"
EXPECTED = HERE / "test_bundle.expected.json"

LLM_METADATA = """
start_token { token_ids { ids: 2 } }
stop_tokens { token_ids { ids: 1 } }
stop_tokens { token_ids { ids: 106 } }
stop_tokens { token_str: "<end_of_turn>" }
max_num_tokens: 256
llm_model_type { gemma4 {} }
"""

# A tiny Gemma-style BPE tokenizer: specials, 256 byte-fallback tokens, a few letters and merges.
_PIECES = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + [
    "\u2581", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello", "\u2581w", "or", "<start_of_turn>"]
TOKENIZER_JSON = {
    "version": "1.0",
    "added_tokens": [{"id": i, "content": p, "special": True} for i, p in enumerate(_PIECES)
                     if p in ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>")],
    "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    "model": {"type": "BPE", "unk_token": "<unk>", "byte_fallback": True,
              "vocab": {p: i for i, p in enumerate(_PIECES)},
              "merges": [["h", "e"], ["l", "l"], ["he", "ll"], ["hell", "o"], ["\u2581", "w"], ["o", "r"]]},
}


def tiny_tflite(description: str) -> bytes:
    """A minimal TFLite model FlatBuffer: Model{version: 3 (field 0), description (field 3)}, id TFL3."""
    b = flatbuffers.Builder(64)
    desc = b.CreateString(description)
    b.StartObject(4)
    b.PrependUint32Slot(0, 3, 0)
    b.PrependUOffsetTRelativeSlot(3, desc, 0)
    model = b.EndObject()
    b.Finish(model, file_identifier=b"TFL3")
    return bytes(b.Output())


def build(path: pathlib.Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "llm_metadata.textproto").write_text(LLM_METADATA)
        (tmp / "tokenizer.json").write_text(json.dumps(TOKENIZER_JSON))
        builder = lb.LitertLmFileBuilder()
        builder.add_system_metadata(lb.Metadata("Authors", "edge-mtp spec-core test fixture", lb.DType.STRING))
        builder.add_system_metadata(lb.Metadata("test_int32", -7, lb.DType.INT32))
        builder.add_system_metadata(lb.Metadata("test_uint64", 1 << 40, lb.DType.UINT64))
        builder.add_system_metadata(lb.Metadata("test_float32", 0.5, lb.DType.FLOAT32))
        builder.add_system_metadata(lb.Metadata("test_bool", True, lb.DType.BOOL))
        builder.add_llm_metadata(str(tmp / "llm_metadata.textproto"), supports_thinking=False,
                                 supports_function_calling=False)
        builder.add_hf_tokenizer(str(tmp / "tokenizer.json"))
        for name, kind in [("target", lb.TfLiteModelType.PREFILL_DECODE), ("embedder", lb.TfLiteModelType.EMBEDDER),
                           ("drafter", lb.TfLiteModelType.MTP_DRAFTER)]:
            model = tmp / f"{name}.tflite"
            model.write_bytes(tiny_tflite(f"edge-mtp test {name}"))
            builder.add_tflite_model(str(model), kind)
        with open(path, "wb") as f:
            builder.build(f, validate_metadata=True)


# VData union tag -> (schema table class, builder dtype name); field 0 of each table holds the value.
_VDATA = {1: (schema.UInt8, "uint8"), 2: (schema.Int8, "int8"), 3: (schema.UInt16, "uint16"),
          4: (schema.Int16, "int16"), 5: (schema.UInt32, "uint32"), 6: (schema.Int32, "int32"),
          7: (schema.Float32, "float32"), 8: (schema.Bool, "bool"), 9: (schema.StringValue, "string"),
          10: (schema.UInt64, "uint64"), 11: (schema.Int64, "int64"), 12: (schema.Double, "double")}


def _items(count, get) -> dict:
    """Key/value pairs read with the generated accessors (its object API has a broken union creator)."""
    out = {}
    for i in range(count):
        kvp = get(i)
        cls, dtype = _VDATA[kvp.ValueType()]
        table = kvp.Value()
        value_table = cls()
        value_table.Init(table.Bytes, table.Pos)
        value = value_table.Value()
        out[kvp.Key().decode()] = {"type": dtype, "value": value.decode() if isinstance(value, bytes) else value}
    return out


def describe(path: pathlib.Path) -> dict:
    """What any correct reader must find in `path`, read with the builder's generated schema."""
    data = path.read_bytes()
    assert data[:8] == b"LITERTLM", f"{path} is not a .litertlm file"
    major, minor, patch = struct.unpack_from("<III", data, 8)
    (header_end,) = struct.unpack_from("<Q", data, 24)
    meta = schema.LiteRTLMMetaData.GetRootAs(data[32:header_end], 0)
    system = meta.SystemMetadata()
    section_meta = meta.SectionMetadata()
    sections = []
    llm = None
    for i in range(section_meta.ObjectsLength()):
        obj = section_meta.Objects(i)
        sections.append({"data_type": obj.DataType(), "begin": obj.BeginOffset(), "end": obj.EndOffset(),
                         "items": _items(obj.ItemsLength(), obj.Items)})
        if obj.DataType() == schema.AnySectionDataType.LlmMetadataProto:
            llm = llm_metadata_pb2.LlmMetadata.FromString(data[obj.BeginOffset():obj.EndOffset()])
    out = {"file_size": len(data), "version": [major, minor, patch], "header_end": header_end,
           "system_metadata": _items(system.EntriesLength(), system.Entries) if system else {},
           "sections": sections}
    if llm is not None:
        out["llm_metadata"] = {
            "start_token_ids": list(llm.start_token.token_ids.ids),
            "stop_token_ids": [list(t.token_ids.ids) for t in llm.stop_tokens if t.HasField("token_ids")],
            "stop_token_strings": [t.token_str for t in llm.stop_tokens if t.HasField("token_str")],
            "max_num_tokens": llm.max_num_tokens,
            "model_type_field": (llm.llm_model_type.ListFields()[0][0].number
                                 if llm.llm_model_type.ListFields() else 0),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--describe", type=pathlib.Path, help="describe this bundle instead of building one")
    args = parser.parse_args()
    target = args.describe or BUNDLE
    if args.describe is None:
        build(BUNDLE)
    EXPECTED.write_text(json.dumps(describe(target), indent=1) + "\n")
    print(f"{target}: {target.stat().st_size} bytes; wrote {EXPECTED.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
