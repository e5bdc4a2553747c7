"""Join ONNX piece graphs by tensor name into one graph whose weights stream into one external-data file.

A piece is a graph file (+ its .data) exported and quantized on its own (export/onnx_format.py). `GraphStitcher.add` appends
its nodes under a per-piece prefix (so every layer's weights and intermediates get their own names), connects its
inputs to the latest tensor of the same interface name (a graph input, or the output of an earlier piece: the hidden
state, a cache a KV-shared layer reads after its owner wrote it) and copies its weights, one tensor at a time, into
the joined data file. Memory holds one piece's graph structure, never a weight of the joined model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..util.errors import EdgeMtpError
from .onnx_data import DataFile, Placed

PIECE_OUTPUT_SUFFIX = "_out"  # a piece output named like one of its inputs (h, k_cache) carries this suffix


class GraphStitcher:
    """Builds one ONNX graph from pieces added in execution order (see module doc)."""

    def __init__(self, data_path: Path):
        self.data = DataFile(data_path)
        self.nodes: list = []
        self.initializers: list = []
        self.opsets: dict[str, int] = {}
        self.ir_version = 0
        self.current: dict[str, str] = {}  # interface name -> the tensor holding its latest value

    def alias(self, name: str, tensor: str) -> None:
        """Pieces reading interface `name` before any piece wrote it read `tensor` (e.g. h <- embeddings)."""
        self.current[name] = tensor

    def add(self, piece: Path, prefix: str, rename: dict[str, str] | None = None,
            placed: dict[str, Placed] | None = None, edit: Callable | None = None) -> None:
        """Append a piece graph: its inputs/outputs renamed by `rename` (generic -> joined interface names), its
        initializers named `placed` already written by the caller, `edit(model)` applied first."""
        import onnx

        rename, placed = rename or {}, placed or {}
        model = onnx.load(str(piece), load_external_data=False)
        if edit is not None:
            edit(model)
        graph = model.graph
        if model.functions or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                  for n in graph.node for a in n.attribute):
            raise EdgeMtpError(f"internal: piece {piece.name} has functions or subgraphs, which cannot be joined; "
                               "please report it with the checkpoint's config.json.")
        for op in model.opset_import:
            self.opsets[op.domain] = max(self.opsets.get(op.domain, 0), op.version)
        self.ir_version = max(self.ir_version, model.ir_version)
        inputs = {i.name for i in graph.input}
        names = {"": ""}
        for name in inputs:
            real = rename.get(name, name)
            names[name] = self.current.get(real, real)
        produced = {}
        for o in graph.output:
            stem = o.name[:-len(PIECE_OUTPUT_SUFFIX)] if o.name.endswith(PIECE_OUTPUT_SUFFIX) else o.name
            real = rename.get(stem, stem) if stem in inputs or o.name == stem else o.name
            produced[o.name] = real
            names[o.name] = f"{prefix}/{real}"

        def name(n: str) -> str:
            return names.get(n, f"{prefix}/{n}")

        for init in graph.initializer:
            old = init.name
            init.name = name(old)
            if old in placed:
                self.data.place(init, placed[old])
            elif init.data_location == onnx.TensorProto.EXTERNAL:
                self.data.copy_in(init, piece.parent)
            self.initializers.append(init)
        for k, node in enumerate(graph.node):
            node.name = f"{prefix}/{node.name or f'#{k}'}"  # node names must be unique in the joined graph
            for field in (node.input, node.output):
                renamed = [name(n) for n in field]
                del field[:]
                field.extend(renamed)
            self.nodes.append(node)
        for o, real in produced.items():
            self.current[real] = names[o]

    def finish(self, path: Path, inputs: list, outputs: list, interface: dict[str, str]) -> Path:
        """Write the joined graph to `path` (next to the data file): `inputs`/`outputs` are ValueInfoProtos and
        `interface` maps each graph output name to the interface name whose latest tensor it is."""
        import onnx

        self.data.close()
        final = {self.current[iface]: out for out, iface in interface.items()}
        for node in self.nodes:
            renamed = [final.get(n, n) for n in node.output]
            del node.output[:]
            node.output.extend(renamed)
            renamed = [final.get(n, n) for n in node.input]
            del node.input[:]
            node.input.extend(renamed)
        graph = onnx.helper.make_graph(self.nodes, path.stem, inputs, outputs, initializer=self.initializers)
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v)
                                                             for d, v in sorted(self.opsets.items())])
        model.ir_version = self.ir_version
        onnx.save_model(model, str(path))
        return path

