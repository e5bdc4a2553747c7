"""A LiteRT model with its StableHLO composites replaced by their decompositions.

Targets that take `param_tensor` write and read their caches through LiteRT's in-place composites (model/kv_update.py).
LiteRT's GPU delegate lowers those only with the external, buffer-storage KV tensors that LiteRT-LM configures, which
ai-edge-litert's Python API cannot ask for (compiling such a target on the GPU from Python crashes the process). Our
backend binds one buffer as a cache's input and output anyway, so on the GPU it runs the decompositions instead: the
same DYNAMIC_UPDATE_SLICE and matmuls the CPU runs.
"""

from __future__ import annotations

import copy

_ALIGN = 64


def inline_composites(model: bytes) -> bytes:
    """`model` with every STABLEHLO_COMPOSITE op of its signature subgraphs replaced by its decomposition's ops."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    composite = {i for i, c in enumerate(m.operatorCodes)
                 if max(c.builtinCode, c.deprecatedBuiltinCode) == schema.BuiltinOperator.STABLEHLO_COMPOSITE}
    if not composite:
        return model
    for sig in m.signatureDefs:
        graph = m.subgraphs[sig.subgraphIndex]
        ops = []
        for op in graph.operators:
            if op.opcodeIndex not in composite:
                ops.append(op)
                continue
            body = m.subgraphs[op.builtinOptions2.decompositionSubgraphIndex]
            index = dict(zip(body.inputs, op.inputs)) | dict(zip(body.outputs, op.outputs))
            for i, tensor in enumerate(body.tensors):
                if i not in index:
                    graph.tensors.append(copy.deepcopy(tensor))
                    index[i] = len(graph.tensors) - 1
            for inner in body.operators:
                clone = copy.copy(inner)
                clone.inputs = [index[i] if i >= 0 else i for i in inner.inputs]
                clone.outputs = [index[i] for i in inner.outputs]
                ops.append(clone)
        graph.operators = ops
    return _pack(schema, flatbuffers, m, model)


def _pack(schema, flatbuffers, m, original: bytes) -> bytes:
    """Pack `m`, carrying over weights stored after the flatbuffer (offset buffers) with their offsets moved."""
    spans = [b for b in m.buffers if b.offset and b.offset > 1]

    def packed() -> bytes:
        builder = flatbuffers.Builder(1024)
        builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    head = packed()  # offsets are never 0 here, so moving them keeps the size
    if not spans:
        return head
    old_base = min(b.offset for b in spans)
    new_base = len(head) + (-len(head) % _ALIGN)
    for b in spans:
        b.offset += new_base - old_base
    head = packed()
    return head + b"\0" * (new_base - len(head)) + original[old_base:]
