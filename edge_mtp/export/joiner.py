"""Joining separately converted pieces into one multi-signature .tflite, and refilling a piece's weights (a .tflite is
read and written by formats/tflite.py).

Pieces of a model are converted separately (litert-torch), then joined here into one multi-signature model: each
signature's subgraph is the concatenation of the pieces' subgraphs of that signature, linked by tensor name (an
input named `h` reads the latest output named `h`). Weights are never held together: each piece's buffers are
appended to a data file as the piece is added, and the final file carries them after the flatbuffer, addressed by
`Buffer.offset` (how LiteRT stores models over 2 GB).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..formats.tflite import ALIGN, op_name, pack, read_tflite, signature_io, signature_keys, tensor_name, write_model
from ..formats.tflite import schema as tflite_schema
from ..model.contract import Signature, TensorSpec
from ..util.errors import EdgeMtpError
from .pieces import digest

_TYPES = {"float32": 0, "float16": 1, "int32": 2, "int64": 4, "bool": 6, "int8": 9}
# Ops whose options name other subgraphs: a piece holding one cannot be joined by renumbering tensors alone.
_SUBGRAPH_OPS = ("WHILE", "IF", "CALL_ONCE", "STABLEHLO_WHILE", "STABLEHLO_CASE")


# -------------------------------------------------------------------------------------------------------------
# Weights of a converted piece


@dataclass(frozen=True)
class WeightSlot:
    """Where a module tensor sits in a converted model: its buffer, and whether the converter transposed it."""

    buffer: int
    transposed: bool = False


def locate_weights(model, weights: dict[str, np.ndarray]) -> dict[str, WeightSlot]:
    """Find each weight's buffer by content (the piece was converted with distinct random values per tensor).

    Raises EdgeMtpError naming the first weight the converter folded into other constants or duplicated, since
    its buffer then cannot be refilled with another layer's values.
    """
    by_digest: dict[bytes, list[int]] = {}
    for index, buffer in enumerate(model.buffers):
        if buffer.data is not None and len(buffer.data):
            by_digest.setdefault(digest(np.ascontiguousarray(buffer.data)), []).append(index)
    slots = {}
    for name, value in weights.items():
        value = np.asarray(value, dtype=np.float32)
        found = [WeightSlot(b) for b in by_digest.get(digest(np.ascontiguousarray(value)), [])]
        if value.ndim == 2:
            found += [WeightSlot(b, True) for b in by_digest.get(digest(np.ascontiguousarray(value.T)), [])]
        if len(found) != 1:
            raise EdgeMtpError(f"weight {name} appears {len(found)} times in the converted piece")
        slots[name] = found[0]
    return slots


def refill_weights(template: Path, slots: dict[str, WeightSlot], weights: dict[str, np.ndarray], out: Path) -> Path:
    """Write a copy of a converted piece whose located weights hold new values (same shapes, fp32)."""
    model = read_tflite(template)
    for name, slot in slots.items():
        value = np.asarray(weights[name], dtype=np.float32)
        value = value.T if slot.transposed else value
        old = model.buffers[slot.buffer].data
        if old is None or len(old) != value.nbytes:
            raise EdgeMtpError(f"weight {name} has {value.nbytes} bytes, its slot in {template.name} {len(old or [])}")
        model.buffers[slot.buffer].data = np.frombuffer(np.ascontiguousarray(value).tobytes(), dtype=np.uint8)
    out.write_bytes(pack(model))
    return out


# -------------------------------------------------------------------------------------------------------------
# Joining pieces


class BufferData:
    """Raw bytes of one buffer that the joiner streams into its data file: an array, or chunks from a generator."""

    def __init__(self, data: np.ndarray | bytes | Iterable[bytes | np.ndarray], size: int | None = None):
        self.data, self.size = data, size

    def chunks(self) -> Iterable[memoryview]:
        """The bytes, in order."""
        if isinstance(self.data, (bytes, bytearray, np.ndarray, memoryview)):
            yield memoryview(np.ascontiguousarray(self.data).view(np.uint8).reshape(-1))
        else:
            for chunk in self.data:
                yield memoryview(np.ascontiguousarray(chunk).view(np.uint8).reshape(-1))


class GraphJoiner:
    """Builds one model with a subgraph per signature out of pieces whose signatures carry the same names."""

    def __init__(self, signatures: Sequence[Signature], data_file: Path):
        self.schema = schema = tflite_schema()
        self.signatures = list(signatures)
        self.model = schema.ModelT()
        self.model.version = 3
        self.model.description = "edge-mtp streamed export"
        self.model.operatorCodes, self.model.buffers, self.model.subgraphs = [], [schema.BufferT()], []
        self.spans: dict[int, tuple[int, int]] = {}  # buffer -> (offset in the data file, size)
        self.lead_spans: dict[int, tuple[int, int]] = {}  # the same, in the leading buffers' file
        self.data_file = data_file
        self._data = open(data_file, "wb")
        self._lead = None
        self._opcodes: dict[tuple, int] = {}
        self.producers: list[dict[str, int]] = []
        for sig in self.signatures:
            subgraph = schema.SubGraphT()
            subgraph.name = sig.name
            subgraph.tensors, subgraph.operators = [], []
            subgraph.inputs = [self._new_tensor(subgraph, spec) for spec in sig.inputs]
            self.model.subgraphs.append(subgraph)
            self.producers.append({spec.name: index for spec, index in zip(sig.inputs, subgraph.inputs)})

    def _new_tensor(self, subgraph, spec: TensorSpec) -> int:
        t = self.schema.TensorT()
        t.name, t.shape, t.type, t.buffer = spec.name, list(spec.shape), _TYPES[spec.dtype], 0
        subgraph.tensors.append(t)
        return len(subgraph.tensors) - 1

    def alias(self, name: str, source: str) -> None:
        """Let pieces read `source`'s current tensor under the input name `name` (e.g. h <- embeddings)."""
        for producers in self.producers:
            if source in producers:
                producers[name] = producers[source]

    def append_buffer(self, data: BufferData, lead: bool = False) -> int:
        """Stream a buffer's bytes into the data file; returns its index in the joined model. A `lead` buffer comes
        before all others in the written model (the LM head's table, which the bundle's embedder shares)."""
        if lead and self._lead is None:
            self._lead = open(self.data_file.with_suffix(".lead"), "wb")
        stream, spans = (self._lead, self.lead_spans) if lead else (self._data, self.spans)
        offset = stream.tell()
        pad = -offset % ALIGN
        stream.write(b"\0" * pad)
        offset += pad
        size = 0
        for chunk in data.chunks():
            stream.write(chunk)
            size += chunk.nbytes
        if data.size is not None and size != data.size:
            raise EdgeMtpError(f"internal: a streamed buffer gave {size} bytes instead of {data.size}")
        self.model.buffers.append(self.schema.BufferT())
        index = len(self.model.buffers) - 1
        spans[index] = (offset, size)
        return index

    def _opcode(self, code) -> int:
        custom = code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode
        key = (code.builtinCode, code.deprecatedBuiltinCode, custom, code.version)
        if key not in self._opcodes:
            self.model.operatorCodes.append(code)
            self._opcodes[key] = len(self.model.operatorCodes) - 1
        return self._opcodes[key]

    def add(self, piece_path: Path, prefix: str, rename: dict[str, str] | None = None,
            replace: dict[int, BufferData | int] | None = None, model=None) -> None:
        """Append a piece to every joined signature it has.

        Each piece input reads the latest tensor of its (renamed) name; each piece output becomes the latest of its
        name. Buffers the piece's signatures share stay shared; `replace` streams other bytes for some buffers (or
        names a buffer of the joined model, from append_buffer);
        `model` is the piece already read (and perhaps changed, see tables.widen).
        """
        model = model if model is not None else read_tflite(piece_path)
        replace, rename = replace or {}, rename or {}
        for op in (o for sg in model.subgraphs for o in sg.operators):
            if op_name(model, op) in _SUBGRAPH_OPS:
                raise EdgeMtpError(f"internal: piece {prefix} holds a {op_name(model, op)} op, which cannot be joined")
        buffer_map = {0: 0}
        self._decompositions: dict[int, int] = {}  # piece subgraph -> joined subgraph, per piece
        keys = signature_keys(model)
        for position, sig in enumerate(self.signatures):
            if sig.name not in keys:
                continue
            index, inputs, outputs = signature_io(model, sig.name)
            inputs = {rename.get(n, n): i for n, i in inputs.items()}
            outputs = {rename.get(n, n): i for n, i in outputs.items()}
            self._add_subgraph(model, model.subgraphs[index], position, inputs, outputs, prefix, buffer_map, replace)

    def _add_subgraph(self, model, piece, position: int, inputs: dict[str, int], outputs: dict[str, int],
                      prefix: str, buffer_map: dict[int, int], replace: dict[int, BufferData]) -> None:
        joined, producers = self.model.subgraphs[position], self.producers[position]
        tensor_map: dict[int, int] = {-1: -1}
        for name, index in inputs.items():
            if name not in producers:
                raise EdgeMtpError(f"internal: piece {prefix} reads '{name}', which nothing produces in "
                                   f"{self.signatures[position].name}")
            mine, theirs = piece.tensors[index], joined.tensors[producers[name]]
            if list(mine.shape) != list(theirs.shape) or mine.type != theirs.type:
                raise EdgeMtpError(f"internal: piece {prefix} reads '{name}' as {list(mine.shape)} "
                                   f"but it is {list(theirs.shape)}")
            tensor_map[index] = producers[name]
        copied = [i for i in range(len(piece.tensors)) if i not in tensor_map]
        for index in copied:
            tensor = piece.tensors[index]
            clone = self._clone_tensor(model, tensor, buffer_map, replace)
            clone.name = f"{prefix}/{tensor_name(tensor)}"
            joined.tensors.append(clone)
            tensor_map[index] = len(joined.tensors) - 1
        for index in copied:
            details = joined.tensors[tensor_map[index]].quantization
            details = details.details if details is not None else None
            if isinstance(details, self.schema.BlockwiseQuantizationT):
                details.scales = tensor_map[details.scales]
                details.zeroPoints = tensor_map.get(details.zeroPoints, -1)
        for op in piece.operators:
            clone = self._clone_op(model, op)
            if op_name(model, op) == "STABLEHLO_COMPOSITE":
                options = copy.deepcopy(op.builtinOptions2)
                options.decompositionSubgraphIndex = self._decomposition(model, options.decompositionSubgraphIndex,
                                                                         prefix, buffer_map, replace)
                clone.builtinOptions2 = options
            clone.inputs = [tensor_map[i] for i in op.inputs]
            clone.outputs = [tensor_map[i] for i in op.outputs]
            clone.intermediates = [tensor_map[i] for i in op.intermediates] if op.intermediates is not None else None
            joined.operators.append(clone)
        for name, index in outputs.items():
            producers[name] = tensor_map[index]

    def _clone_tensor(self, model, tensor, buffer_map: dict[int, int], replace: dict[int, BufferData | int]):
        """A piece's tensor for the joined model, its buffer appended once per piece (or replaced by `replace`)."""
        clone = copy.deepcopy(tensor)
        clone.buffer = 0
        if tensor.buffer:
            if tensor.buffer not in buffer_map:
                source = replace.get(tensor.buffer)
                if not isinstance(source, int):  # an int: a buffer the joined model holds already
                    source = self.append_buffer(source or BufferData(np.asarray(model.buffers[tensor.buffer].data)))
                buffer_map[tensor.buffer] = source
            clone.buffer = buffer_map[tensor.buffer]
        return clone

    def _clone_op(self, model, op):
        """A piece's operator with its opcode registered in the joined model (tensor indices still the piece's)."""
        clone = self.schema.OperatorT()
        clone.__dict__.update(op.__dict__)
        clone.opcodeIndex = self._opcode(model.operatorCodes[op.opcodeIndex])
        return clone

    def _decomposition(self, model, index: int, prefix: str, buffer_map: dict[int, int],
                       replace: dict[int, BufferData]) -> int:
        """Copy a composite's decomposition subgraph of a piece into the joined model once; its new index."""
        if index not in self._decompositions:
            piece = model.subgraphs[index]
            sub = self.schema.SubGraphT()
            sub.name = f"{prefix}/{piece.name.decode() if isinstance(piece.name, bytes) else piece.name}"
            self.model.subgraphs.append(sub)
            self._decompositions[index] = len(self.model.subgraphs) - 1
            sub.tensors = [self._clone_tensor(model, tensor, buffer_map, replace) for tensor in piece.tensors]
            sub.operators = [self._clone_op(model, op) for op in piece.operators]
            sub.inputs, sub.outputs = list(piece.inputs), list(piece.outputs)
        return self._decompositions[index]

    def finish(self, out: Path) -> Path:
        """Close the signatures (outputs by contract name), drop dead ops, and write the model to `out`."""
        schema = self.schema
        self._data.close()
        files, spans = [self.data_file], dict(self.spans)
        if self._lead is not None:
            lead = self._lead.tell() + (-self._lead.tell() % ALIGN)
            self._lead.close()
            files = [Path(self._lead.name), self.data_file]
            spans = {**self.lead_spans, **{i: (lead + offset, size) for i, (offset, size) in self.spans.items()}}
        self.model.signatureDefs = []
        for position, sig in enumerate(self.signatures):
            subgraph, producers = self.model.subgraphs[position], self.producers[position]
            missing = [o.name for o in sig.outputs if o.name not in producers]
            if missing:
                raise EdgeMtpError(f"internal: no piece produces {missing} for {sig.name}")
            subgraph.outputs = [producers[o.name] for o in sig.outputs]
            _drop_dead_ops(subgraph)
            definition = schema.SignatureDefT()
            definition.signatureKey, definition.subgraphIndex = sig.name, position
            definition.inputs = [_tensor_map(schema, s.name, i) for s, i in zip(sig.inputs, subgraph.inputs)]
            definition.outputs = [_tensor_map(schema, s.name, i) for s, i in zip(sig.outputs, subgraph.outputs)]
            self.model.signatureDefs.append(definition)
        write_model(self.model, spans, files, out)
        for path in files:
            os.unlink(path)
        return out


def _tensor_map(schema, name: str, index: int):
    m = schema.TensorMapT()
    m.name, m.tensorIndex = name, index
    return m


def _drop_dead_ops(subgraph) -> None:
    """Remove operators none of whose outputs reach the subgraph's outputs (e.g. layers a prefill never needs)."""
    needed = set(subgraph.outputs)
    kept = []
    for op in reversed(subgraph.operators):
        if any(o in needed for o in op.outputs):
            kept.append(op)
            needed.update(i for i in op.inputs if i >= 0)
    subgraph.operators = kept[::-1]
