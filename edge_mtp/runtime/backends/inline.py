"""A LiteRT model with its StableHLO composites replaced by their decompositions.

Targets that take `param_tensor` write and read their caches through LiteRT's in-place composites (model/kv_update.py).
LiteRT's GPU delegate lowers those only with the external, buffer-storage KV tensors that LiteRT-LM configures, which
ai-edge-litert's Python API cannot ask for (compiling such a target on the GPU from Python crashes the process). Our
backend binds one buffer as a cache's input and output anyway, so on the GPU it runs the decompositions instead: the
same DYNAMIC_UPDATE_SLICE and matmuls the CPU runs.
"""

from __future__ import annotations

import copy

from ...formats.tflite import repack, schema, unpack


def inline_composites(model: bytes) -> bytes:
    """`model` with every STABLEHLO_COMPOSITE op of its signature subgraphs replaced by its decomposition's ops."""
    m = unpack(model)
    composite = {i for i, c in enumerate(m.operatorCodes)
                 if max(c.builtinCode, c.deprecatedBuiltinCode) == schema().BuiltinOperator.STABLEHLO_COMPOSITE}
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
    return repack(m, model)
