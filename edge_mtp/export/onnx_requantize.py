"""Quantize a finished fp32 ONNX graph (a bundle's target, embedder, ...) one weight group at a time.

`edge-mtp quantize` cannot load a real-size graph (E2B's per-layer-embedding table alone is 9.4 GB in fp32). The graph
is read without its weights and rewritten node group by node group with the export's own recipe code: the matmuls and
lookups that read the same activation (so int8 quantizes that activation once, as it does in an exported piece) are
cut out into a small graph with just their weights, quantized by `onnx_quantize.quantize_graph` (onnxruntime's
quantizers, exactly as an export quantizes its pieces), and spliced back; vocabulary tables go through the export's
chunked table path (`onnx_tables`: the small graph gets the table's first rows, the whole table is encoded in row
chunks). Every other weight is copied byte for byte (in the kernel). Memory holds one group's weights (a layer's largest
is E2B's 2 x 75 MB gate and up projections) or one table chunk, never the model; the output's names, operators and
weight bytes are those a direct export with the same recipe gives (tests/test_quantize.py compares them).

`quantize_onnx_bundle` applies a recipe to a finished fp32 bundle folder this way, graph by graph, and measures the
result against its source.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from ..bundle.onnx_folder import (CHAT_TEMPLATE, MANIFEST, TOKENIZER_CONFIG, TOKENIZER_FILE, build_manifest,
                                  contract_from_manifest, read_manifest, tokenizer_info)
from ..bundle.tokenizer import Tokenizer
from ..model.contract import DECODE, DRAFTER, EMBEDDER, PER_LAYER_EMBEDDER, TARGET, VERIFY, Contract, Signature
from ..util.atomic import atomic_directory
from ..util.errors import EdgeMtpError
from .driver import Progress, export_resource_errors, mixed_choice
from .onnx_format import ort_session, run_onnx
from .onnx_data import DataFile, stored_array, stored_nbytes, stored_rows
from .onnx_quantize import (FP16_MIN_ELEMENTS, INLINE_BYTES, data_file, fp16_cast, fp16_name, graph_bytes,
                            quantize_graph, remove_graph, save_graph, weight_bytes)
from .onnx_tables import TABLE_PIECES, locate_table, write_table
from .options import check_quantize_options
from .pieces import ROW_CHUNK_BYTES, small_vocab
from .quality import quantization_report, report_prompts
from .signatures import relative_error, sample_inputs

_WEIGHT_INPUT = {"MatMul": 1, "Gather": 0}  # the ops a recipe quantizes, and which input is the weight
_ACTIVATION_INPUT = {"MatMul": 0, "Gather": 1}


def requantize_graph(src: Path, recipe: str, dst: Path, vocab: int, scratch: Path,
                     on_weight: Callable[[int, int], None] = lambda done, total: None) -> Path:
    """Write `dst` (+ .data): the fp32 graph `src` under a uniform recipe (fp16, int8, int4[-bN]), holding one
    weight group at a time; `vocab` marks the tables done in row chunks, `on_weight(done, total)` reports progress."""
    import onnx

    src, dst = Path(src), Path(dst)
    if recipe == "fp32":
        return quantize_graph(src, recipe, dst)
    model = onnx.load(str(src), load_external_data=False)
    remove_graph(dst)
    data = DataFile(data_file(dst))
    try:
        if recipe == "fp16":
            _fp16(model, src.parent, data, on_weight)
        else:
            _Rewrite(model, src.parent, data, recipe, vocab, scratch).run(on_weight)
    finally:
        data.close()
    onnx.save_model(model, str(dst))
    return dst


# -- fp16: one initializer at a time --------------------------------------------------------------------------------

def _fp16(model, folder: Path, data: DataFile, on_weight: Callable[[int, int], None]) -> None:
    """Every large fp32 initializer stored as fp16 behind a Cast (onnx_quantize's fp16 recipe), cast row chunk by
    row chunk; the others copied."""
    import onnx

    graph = model.graph
    casts, keep = [], []
    for k, init in enumerate(graph.initializer):
        if init.data_type == onnx.TensorProto.FLOAT and int(np.prod(init.dims)) >= FP16_MIN_ELEMENTS:
            half = onnx.TensorProto(name=fp16_name(init.name), data_type=onnx.TensorProto.FLOAT16, dims=init.dims)
            _store(half, _half_chunks(init, folder), 2 * int(np.prod(init.dims)), data)
            keep.append(half)
            casts.append(fp16_cast(init.name))
        else:
            keep.append(_copied(init, folder, data))
        on_weight(k + 1, len(graph.initializer))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)


def _half_chunks(init, folder: Path):
    """fp16 bytes of an fp32 initializer, in row chunks of its stored layout."""
    import onnx

    if init.data_location != onnx.TensorProto.EXTERNAL or len(init.dims) != 2:
        yield stored_array(init, folder).astype(np.float16).tobytes()
        return
    rows, cols = init.dims
    step = max(1, ROW_CHUNK_BYTES // (4 * cols))
    for a in range(0, rows, step):
        yield stored_rows(init, folder, 0, a, min(rows, a + step)).astype(np.float16).tobytes()


def _store(init, chunks, nbytes: int, data: DataFile) -> None:
    """Give `init` the `nbytes` bytes of `chunks`: inline when onnx.save_model would keep them inline (as in an
    exported graph), else streamed into `data`."""
    if nbytes < 4 * INLINE_BYTES:
        raw = b"".join(chunks)
        if sys.getsizeof(raw) < INLINE_BYTES:
            init.raw_data = raw
            return
        chunks = [raw]
    data.write(init, chunks, nbytes)


def _copied(init, folder: Path, data: DataFile):
    """`init` with its external bytes copied into `data` (inline ones stay inline)."""
    import onnx

    if init.data_location == onnx.TensorProto.EXTERNAL:
        data.copy_in(init, folder)
    return init


# -- int8 / int4: node groups through the export's quantizers -------------------------------------------------------

class _Rewrite:
    """The int8/int4 rewrite of one graph (see module doc)."""

    def __init__(self, model, folder: Path, data: DataFile, recipe: str, vocab: int, scratch: Path):
        self.model, self.folder, self.data, self.recipe, self.vocab = model, folder, data, recipe, vocab
        self.scratch = Path(scratch)
        self.nodes = list(model.graph.node)
        self.inits = {i.name: i for i in model.graph.initializer}
        self.consumers: dict[str, set[int]] = {}
        for k, node in enumerate(self.nodes):
            for name in node.input:
                self.consumers.setdefault(name, set()).add(k)
        self.known = set(self.inits) | set(self.consumers) | {o for n in self.nodes for o in n.output}

    def run(self, on_weight: Callable[[int, int], None]) -> None:
        """Quantize every group where its first node was, copy the untouched weights, splice the rest in."""
        graph = self.model.graph
        groups = self._groups()
        at = {group[0]: group for group in groups}
        replaced = {k for group in groups for k in group}
        nodes, spliced, done = [], [], 0
        for k, node in enumerate(self.nodes):
            if k in at:
                new_nodes, new_inits = self._quantize(at[k])
                nodes.extend(new_nodes)
                spliced.extend(new_inits)
                done += 1
                on_weight(done, len(groups))
            elif k not in replaced:
                nodes.append(node)
        used = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
        kept = [_copied(init, self.folder, self.data) for init in graph.initializer if init.name in used]
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.initializer[:]
        graph.initializer.extend(kept + spliced)

    def _weight(self, node):
        """The fp32 initializer a MatMul or Gather reads as its weight, or None."""
        import onnx

        if node.op_type not in _WEIGHT_INPUT or len(node.input) <= _WEIGHT_INPUT[node.op_type]:
            return None
        init = self.inits.get(node.input[_WEIGHT_INPUT[node.op_type]])
        return init if init is not None and init.data_type == onnx.TensorProto.FLOAT else None

    def _is_table(self, node) -> bool:
        """Whether the node reads a vocabulary table the way the export's table path writes one (a lookup of its
        rows, or a matmul by its transpose: the tied LM head) in a table piece, or one too large to hold whole (the
        other widths of a small model may equal its vocabulary)."""
        init = self._weight(node)
        axis = 1 if node.op_type == "MatMul" else 0
        if init is None or len(init.dims) != 2 or init.dims[axis] != self.vocab:
            return False
        return _piece(node) in TABLE_PIECES or stored_nbytes(init) > ROW_CHUNK_BYTES

    def _groups(self) -> list[list[int]]:
        """Node indices quantized together: those of one export piece reading one activation, and a lookup with the
        nodes reading its output (int8 passes a quantized lookup straight on); a table alone. In node order."""
        nodes = self.nodes
        candidates = [k for k, n in enumerate(nodes) if self._weight(n) is not None]
        tables = {k for k in candidates if self._is_table(nodes[k])}
        parent = {k: k for k in candidates}

        def root(k: int) -> int:
            while parent[k] != k:
                parent[k] = k = parent[parent[k]]
            return k

        by_activation: dict[tuple[str, str], int] = {}
        by_weight: dict[str, int] = {}  # a weight two nodes read is quantized once, for both
        lookups = {nodes[k].output[0]: k for k in candidates if nodes[k].op_type == "Gather" and k not in tables}
        for k in candidates:
            weight = by_weight.setdefault(self._weight(nodes[k]).name, k)
            if k in tables or weight in tables:
                if weight != k:
                    raise EdgeMtpError(f"internal: vocabulary table '{self._weight(nodes[k]).name}' is read by more "
                                       "than one node, which the chunked table path cannot rewrite; please report it.")
                continue
            activation = nodes[k].input[_ACTIVATION_INPUT[nodes[k].op_type]]
            key = (activation, _piece(nodes[k]))
            for other in (by_activation.setdefault(key, k), lookups.get(activation), weight):
                if other is not None:
                    parent[root(k)] = root(other)
        groups: dict[int, list[int]] = {}
        for k in candidates:
            groups.setdefault(root(k), []).append(k)
        return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])

    def _quantize(self, group: list[int]) -> tuple[list, list]:
        """Nodes and initializers (bytes already in the data file) replacing the group's nodes under the recipe."""
        import onnx

        fp32, quantized = self.scratch / "group.onnx", self.scratch / "group.q.onnx"
        small_model, table = self._small_graph(group)
        save_graph(small_model, fp32)
        del small_model
        with _quantizer_logs_off():  # onnxruntime logs each node, and warns per graph: here per group
            quantize_graph(fp32, self.recipe, quantized)
        placed, edit = {}, None
        if table is not None:
            init, axis, small = table
            located = locate_table(fp32, quantized, small, stored_rows(init, self.folder, axis, 0, small), self.recipe)
            placed, edit = write_table(located, self.data, lambda a, b: stored_rows(init, self.folder, axis, a, b),
                                       init.dims[axis])
        result = onnx.load(str(quantized), load_external_data=False)
        if edit is not None:
            edit(result)
        self._name_in_piece(result.graph, _piece(self.nodes[group[0]]))
        for op in result.opset_import:
            self._opset(op.domain, op.version)
        self.model.ir_version = max(self.model.ir_version, result.ir_version)
        inits = []
        for init in result.graph.initializer:
            if init.name in placed:
                self.data.place(init, placed[init.name])
            else:
                _copied(init, quantized.parent, self.data)
            inits.append(init)
        remove_graph(fp32)
        remove_graph(quantized)
        return list(result.graph.node), inits

    def _name_in_piece(self, graph, piece: str) -> None:
        """Put the quantizer's new names under the group's piece prefix, as the export's join does when it quantizes
        the piece first (only names made from a graph input, e.g. `embeddings_quantized`, lack it)."""
        if not piece:
            return

        def named(name: str) -> str:
            return name if not name or name in self.known or name.startswith(piece + "/") else f"{piece}/{name}"

        for init in graph.initializer:
            init.name = named(init.name)
        for node in graph.node:
            node.name = named(node.name)
            for field in (node.input, node.output):
                renamed = [named(n) for n in field]
                del field[:]
                field.extend(renamed)

    def _opset(self, domain: str, version: int) -> None:
        for op in self.model.opset_import:
            if op.domain == domain:
                op.version = max(op.version, version)
                return
        self.model.opset_import.add(domain=domain, version=version)

    def _small_graph(self, group: list[int]):
        """A graph of just the group's nodes and weights (a table cut to its first rows); returns it and the
        table's (initializer, vocabulary axis, rows kept), or None."""
        import onnx
        from onnx import helper, numpy_helper

        graph, members = self.model.graph, set(group)
        group_nodes = [self.nodes[k] for k in group]
        produced = {o for n in group_nodes for o in n.output}
        types = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.value_info)}
        inputs, initializers, table, seen = [], [], None, set()
        for node in group_nodes:
            for name in node.input:
                if not name or name in produced or name in seen:
                    continue
                seen.add(name)
                init = self.inits.get(name)
                if init is None:
                    index = node.op_type == "Gather" and name == node.input[1]
                    elem = types.get(name, onnx.TensorProto.INT64 if index else onnx.TensorProto.FLOAT)
                    inputs.append(helper.make_tensor_value_info(name, elem, None))
                elif init is self._weight(node) and self._is_table(node):
                    axis = list(init.dims).index(self.vocab)
                    avoid = {d for d in init.dims if d != self.vocab} | _attribute_ints(node)
                    small = small_vocab(avoid, self.vocab)
                    rows = stored_rows(init, self.folder, axis, 0, small)
                    value = rows if axis == 0 else np.ascontiguousarray(rows.T)
                    initializers.append(numpy_helper.from_array(value, name))
                    table = (init, axis, small)
                else:
                    initializers.append(numpy_helper.from_array(stored_array(init, self.folder), name))
        outside = {o.name for o in graph.output}
        outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for n in group_nodes
                   for o in n.output if o in outside or self.consumers.get(o, set()) - members]
        small_graph = helper.make_graph([_copy_node(n) for n in group_nodes], "group", inputs, outputs,
                                        initializer=initializers)
        small_model = helper.make_model(small_graph, opset_imports=list(self.model.opset_import))
        small_model.ir_version = self.model.ir_version
        return small_model, table


@contextmanager
def _quantizer_logs_off():
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)  # a record per node; its warnings (the opset 21 upgrade) reach edge_mtp.util.quiet
    try:
        yield
    finally:
        logging.disable(previous)


def _piece(node) -> str:
    """The export piece a node of a joined graph came from (its name's prefix; '' in a graph exported whole)."""
    return node.name.split("/")[0] if "/" in node.name else ""


def _attribute_ints(node) -> set[int]:
    import onnx

    return {a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}


def _copy_node(node):
    import onnx

    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _sensitivity_signature(contract: Contract, model: str) -> Signature:
    """The signature a component's 4-bit sensitivity is measured on: verify for the target, else its only one."""
    if model == TARGET:
        return contract.target_signature(VERIFY, contract.verify_len) if contract.drafter is not None else \
            contract.target_signature(DECODE, 1)
    return {EMBEDDER: contract.embedder, PER_LAYER_EMBEDDER: contract.per_layer_embedder,
            DRAFTER: contract.drafter_signature}[model]()


class _Quantization:
    """Applies a recipe to a finished fp32 bundle graph by graph, one weight group at a time (onnx_requantize), and
    records what each component got; `report` then measures the quantized bundle against its fp32 twin."""

    def __init__(self, recipe: str, contract: Contract, scratch: Path,
                 on_progress: Progress = lambda what, done, total: None):
        self.recipe, self.contract, self.scratch, self.on_progress = recipe, contract, scratch, on_progress
        self.components: dict[str, dict] = {}

    def apply(self, model: str, fp32: Path, path: Path) -> None:
        """Write `path` (+ .data): the fp32 graph `fp32` under the recipe ('mixed' decides per component)."""
        error = None
        if self.recipe == "mixed":
            chosen, error = mixed_choice(model, lambda: self._int4_error(model, fp32))
        else:
            chosen = self.recipe
        self._requantize(model, fp32, chosen, path)
        record = {"recipe": chosen, "bytes": graph_bytes(path), "fp32_bytes": graph_bytes(fp32),
                  "matmul_weight_bytes": weight_bytes(path)["matmul"],
                  "fp32_matmul_weight_bytes": weight_bytes(fp32)["matmul"]}
        if error is not None:
            record["int4_error"] = error
        self.components[model] = record

    def _requantize(self, model: str, fp32: Path, recipe: str, path: Path) -> Path:
        def progress(done: int, total: int) -> None:
            self.on_progress(f"{model} weight groups", done, total)
        return requantize_graph(fp32, recipe, path, self.contract.target.vocab_size, self.scratch, progress)

    def _int4_error(self, model: str, fp32: Path) -> float:
        """Relative error of the component's main output under int4, on random inputs (the LiteRT rule); the fp32
        graph and its int4 trial run one after the other, so memory holds one session at a time."""
        trial_dir = self.scratch / "trial"
        trial_dir.mkdir(exist_ok=True)
        try:
            signature = _sensitivity_signature(self.contract, model)
            inputs = sample_inputs(signature, self.contract, seed=7)
            key = next(o.name for o in signature.outputs if not o.name.startswith("kv_cache"))
            want = run_onnx(ort_session(fp32), self.contract, signature, inputs)
            gc.collect()
            trial = self._requantize(model, fp32, "int4", trial_dir / fp32.name)
            got = run_onnx(ort_session(trial), self.contract, signature, inputs)
            return relative_error(got, want, key)
        finally:
            shutil.rmtree(trial_dir, ignore_errors=True)
            gc.collect()

    def report(self, bundle: Path, manifest: dict, fp32_bundle: Path) -> dict:
        """The quantization report of the (manifest-complete) bundle folder against the fp32 bundle folder."""
        prompts = report_prompts(Tokenizer(**tokenizer_info(bundle, manifest)), self.contract.context)
        report = quantization_report(fp32_bundle, bundle, prompts)  # bundle folders open in onnxruntime
        report["components"] = self.components
        gc.collect()
        return report


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG, CHAT_TEMPLATE):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def quantize_onnx_bundle(src_dir: str | Path, out_dir: str | Path, quant: str,
                         on_stage: Callable[[str], None] = lambda s: None,
                         on_progress: Progress = lambda what, done, total: None) -> dict:
    """Quantize a finished fp32 ONNX bundle folder into a new bundle folder (no re-export), one weight group at a
    time, and measure it against the source; returns the new manifest (with its quantization_report)."""
    src, out = Path(src_dir), Path(out_dir)
    check_quantize_options(src, out, quant)
    source = read_manifest(src)
    if source.get("quantization", "fp32") != "fp32":
        raise EdgeMtpError(f"{src} is already quantized ({source['quantization']}); quantize an fp32 bundle.")
    contract = contract_from_manifest(source, str(src / MANIFEST))
    records = json.loads(json.dumps(source["models"]))
    with export_resource_errors(out), atomic_directory(out) as work, \
            tempfile.TemporaryDirectory(prefix=".edge-mtp-", dir=out.parent) as scratch:
        quantization = _Quantization(quant, contract, Path(scratch), on_progress)
        for model, record in records.items():
            if quant != "fp32":
                on_stage(f"quantizing {model} ({quant})")
            quantization.apply(model, src / record["file"], work / record["file"])
            record["external_data"] = sorted(p.name for p in work.glob(f"{record['file']}.data"))
        _copy_tokenizer(src, work)
        manifest = build_manifest(contract, records, source["tokenizer"], work, quantization=quant)
        manifest["source"] = source.get("source")
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if quant != "fp32":
            on_stage("measuring the quantization cost against fp32")
            manifest["quantization_report"] = quantization.report(work, manifest, src)
            (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
        read_manifest(work)
    return manifest
