"""TFLite flatbuffers, read and written: the model files inside `.litertlm` bundles and the exporter's pieces.

Everything that parses or packs a .tflite goes through here (the exporter's joiner, the bundle writer's shared
tables, the GPU check, the GPU backend's composite inlining). Weights may lie after the flatbuffer, addressed by
`Buffer.offset` (how LiteRT stores models over 2 GB); the writers here keep them there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..util.errors import EdgeMtpError

ALIGN = 64  # bytes; every weight starts on a cache line


def schema():
    """The generated TFLite schema module (ai_edge_litert)."""
    from ai_edge_litert import schema_py_generated as schema

    return schema


def mapped_file(path: Path) -> memoryview:
    """A file's bytes, mapped copy-on-write; the mapping holds the only descriptor of the file.

    (ai_edge_litert's own reader leaves its descriptor open, so every piece a run has read and deleted kept its disk
    space until exit: 8 GiB of deleted layer files halfway through an E4B int8 export.)"""
    import mmap

    with open(path, "rb") as f:
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))


def read_tflite(path: Path):
    """A .tflite as a ModelT whose buffer data are zero-copy views of the memory-mapped file."""
    from ai_edge_litert.tools import flatbuffer_utils

    try:
        return flatbuffer_utils.read_model_from_bytearray(mapped_file(path))
    except Exception as e:
        raise EdgeMtpError(f"Cannot read the converted model {path}: {e}") from None


def pack(model) -> bytearray:
    """Serialise a ModelT (buffers with data inline, or offset/size only)."""
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils.convert_object_to_bytearray(model)


def builtin_names() -> dict[int, str]:
    """Builtin operator code -> name (ADD, STABLEHLO_COMPOSITE, ...)."""
    return {v: k for k, v in vars(schema().BuiltinOperator).items() if not k.startswith("_")}


def op_name(model, op) -> str:
    """The builtin (or custom) name of an operator."""
    code = model.operatorCodes[op.opcodeIndex]
    if code.customCode:
        return code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    return builtin_names().get(builtin, str(builtin))


def tensor_name(tensor) -> str:
    """A tensor's name as text."""
    return tensor.name.decode() if isinstance(tensor.name, bytes) else (tensor.name or "")


def signature_io(model, key: str) -> tuple[int, dict[str, int], dict[str, int]]:
    """(subgraph index, input name -> tensor index, output name -> tensor index) of a signature."""
    for sig in model.signatureDefs or []:
        name = sig.signatureKey.decode() if isinstance(sig.signatureKey, bytes) else sig.signatureKey
        if name == key:
            def names(maps):
                return {(m.name.decode() if isinstance(m.name, bytes) else m.name): m.tensorIndex for m in maps or []}
            return sig.subgraphIndex, names(sig.inputs), names(sig.outputs)
    raise KeyError(key)


def signature_keys(model) -> list[str]:
    """The signature names of a model, in order."""
    return [s.signatureKey.decode() if isinstance(s.signatureKey, bytes) else s.signatureKey
            for s in model.signatureDefs or []]


def unpack(model: bytes):
    """A .tflite's bytes as a ModelT (weights stored after the flatbuffer stay where they are, in `model`)."""
    return schema().ModelT.InitFromPackedBuf(bytearray(model), 0)


def repack(m, original: bytes) -> bytes:
    """Pack a ModelT read from `original`, carrying over weights stored after the flatbuffer (offset buffers) with
    their offsets moved."""
    import flatbuffers

    spans = [b for b in m.buffers if b.offset and b.offset > 1]

    def packed() -> bytes:
        builder = flatbuffers.Builder(1024)
        builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    head = packed()  # offsets are never 0 here, so moving them keeps the size
    if not spans:
        return head
    old_base = min(b.offset for b in spans)
    new_base = len(head) + (-len(head) % ALIGN)
    for b in spans:
        b.offset += new_base - old_base
    head = packed()
    return head + b"\0" * (new_base - len(head)) + original[old_base:]


def write_model(model, spans: dict[int, tuple[int, int]], data_files: Sequence[Path], out: Path,
                external: dict[int, tuple[Callable[[int], int], int]] | None = None) -> int:
    """Write a ModelT whose buffers' bytes lie in `data_files` (one after the other, each but the last padded to
    ALIGN) at `spans` (buffer -> offset, size): the flatbuffer, padding, then the data. An `external` buffer
    (-> (place, size)) holds no bytes here: it points at offset place(this file's size), past its end, where the
    container holds them (see bundle.litertlm's shared tables). Returns the file's size."""
    external = external or {}
    for index in [*spans, *external]:
        model.buffers[index].offset, model.buffers[index].size = 1, 1  # keep the fields in the packing
    head = len(pack(model))
    base = head + (-head % ALIGN)
    sizes = [os.path.getsize(path) for path in data_files]
    size = base + sum(n + (-n % ALIGN) for n in sizes[:-1]) + sizes[-1]
    for index, (offset, length) in spans.items():
        model.buffers[index].offset, model.buffers[index].size = base + offset, max(length, 1)
    for index, (place, length) in external.items():
        model.buffers[index].offset, model.buffers[index].size = place(size), length
    flat = pack(model)
    if len(flat) != head:
        raise EdgeMtpError("internal: the flatbuffer changed size when its buffer offsets were set")
    with open(out, "wb") as f:
        f.write(flat)
        f.write(b"\0" * (base - head))
        for path in data_files:
            f.write(b"\0" * (-f.tell() % ALIGN))
            with open(path, "rb") as data:
                shutil.copyfileobj(data, f, 16 << 20)
    return size


def detach_buffer(path: Path, buffer: int, out: Path, place: Callable[[int], int]) -> int:
    """Copy the model at `path` to `out` without one buffer's bytes, which it then reads at place(out's size)
    beyond its own end; returns out's size."""
    model = read_tflite(path)
    length = len(model.buffers[buffer].data)
    spans, data_file = {}, out.with_suffix(".data")
    with open(data_file, "wb") as f:
        for index, b in enumerate(model.buffers):
            if index == buffer or b.data is None or not len(b.data):
                continue
            f.write(b"\0" * (-f.tell() % ALIGN))
            spans[index] = (f.tell(), len(b.data))
            f.write(memoryview(np.asarray(b.data)).cast("B"))
            b.data = None
    model.buffers[buffer].data = None
    try:
        return write_model(model, spans, [data_file], out, {buffer: (place, length)})
    finally:
        os.unlink(data_file)


def shared_buffer(a: Path, b: Path) -> tuple[int, int, int] | None:
    """(buffer index in model a, byte offset in model b's file, size) when a's largest buffer is, byte for byte, a
    buffer of model b; else None."""
    import mmap

    model = read_tflite(a)
    sizes = [len(buf.data) if buf.data is not None else 0 for buf in model.buffers]
    index = int(np.argmax(sizes))
    if not sizes[index]:
        return None
    mine = np.asarray(model.buffers[index].data).view(np.uint8).reshape(-1)
    with open(b, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as raw:
        root = schema().Model.GetRootAs(raw, 0)
        for i in range(root.BuffersLength()):
            buf = root.Buffers(i)
            if buf.Size() == sizes[index] and buf.Offset() > 1:
                theirs = np.frombuffer(raw, np.uint8, buf.Size(), buf.Offset())
                same = np.array_equal(theirs, mine)
                del theirs  # the mmap cannot close while a view of it lives
                if same:
                    return index, buf.Offset(), buf.Size()
    return None
