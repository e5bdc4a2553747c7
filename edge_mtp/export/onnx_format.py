"""The ONNX format of the export driver: exports, checks, quantizes and stitches pieces into ONNX graphs, and writes
them with a manifest, checked end to end, into one bundle folder.

Graphs: `embedder.onnx`, `per_layer_embedder.onnx` (with PLE), `target.onnx`, `drafter.onnx` (with an assistant).
The target is ONE graph with a dynamic token axis T (1 <= T <= max(prefill, G+1)) that serves `prefill_<T>`,
`decode` and `verify`: one weight copy on disk and in memory, one session. Its caches are written with
ScatterElements whose outputs `kv_cache_*_out` are graph outputs, so onnxruntime updates a cache in place when the
same OrtValue is bound as input and output (runtime/backends/ort.py).

Each piece is exported with torch.onnx on a dynamic token axis, its initializers named after the checkpoint weights
they hold (export/onnx_stored.py), quantized (export/onnx_quantize.py) and appended to the stitched graph, whose
weights stream into `<graph>.data` (export/onnx_stitch.py). A table piece's whole table is quantized in row chunks
straight into the data file (export/onnx_tables.py). The finished bundle is checked end to end against the streamed
PyTorch reference (export/bundle_check.py), whose numbers are the manifest's `quantization_report`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from ..bundle.onnx_folder import (CHAT_TEMPLATE, MANIFEST, TOKEN_AXIS, TOKENIZER_CONFIG, TOKENIZER_FILE, build_manifest,
                                  model_file, onnx_output_name, read_manifest)
from ..model.contract import DECODE, DRAFTER, EMBEDDER, PER_LAYER_EMBEDDER, TARGET, Contract, Signature, kv_output_name
from ..model.drafter import Drafter
from ..model.loading import TargetSource, build_target
from ..util.atomic import atomic_directory
from ..util.errors import EdgeMtpError
from ..util.quiet import converter_output_quiet
from .driver import PieceReport, StreamedExport, Table, signature_names
from .onnx_quantize import graph_bytes, quantize_graph, remove_graph, weight_bytes
from .onnx_stitch import PIECE_OUTPUT_SUFFIX, GraphStitcher
from .onnx_stored import name_weights
from .onnx_tables import locate_table, write_table
from .pieces import HIDDEN, PieceSamples

if TYPE_CHECKING:
    from ..bundle.litertlm import BundleMetadata  # the tokenizer's metadata, shared with the LiteRT bundle

OPSET = 20
_TOKEN_AXES = {"embeddings": 1, "per_layer_embeddings": 1, "input_pos": 0, "mask": 2, "logits": 1, "activations": 1}


class _Listed(torch.nn.Module):
    """A piece called with one list of tensors in a fixed name order (what dynamic_shapes can match: torch.onnx
    turns tuples into lists, so *varargs never match their spec); returns its outputs in a fixed order."""

    def __init__(self, module: torch.nn.Module, inputs: list[str], outputs: list[str]):
        super().__init__()
        self.module, self.inputs, self.outputs = module, inputs, outputs

    def forward(self, args: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = self.module(**dict(zip(self.inputs, args)))
        return tuple(out[n] for n in self.outputs)


def _torch(row: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.copy()) for k, v in row.items()}  # copies: a module may write a cache in place


def piece_output_name(name: str, inputs: list[str]) -> str:
    """The graph output of a piece output: its own name, or name + '_out' when an input has that name."""
    return name + PIECE_OUTPUT_SUFFIX if name in inputs else name


def export_piece(module: torch.nn.Module, samples: PieceSamples, path: Path,
                 inputs: list[str] | None = None) -> Path:
    """torch.onnx one piece (+ `path`.data): inputs in sample order (or `inputs`), every axis whose size differs
    between signatures dynamic, traced on the largest signature."""
    rows = {name: rows[0] for name, rows in samples.by_signature.items()}
    first = next(iter(rows.values()))
    inputs = inputs or list(first)
    trace = max(rows.values(), key=lambda r: sum(v.size for v in r.values()))
    dynamic = []
    for name in inputs:
        sizes = {r[name].shape for r in rows.values()}
        axes = [a for a in range(first[name].ndim) if len({s[a] for s in sizes}) > 1]
        dynamic.append({a: torch.export.Dim.AUTO for a in axes} or None)
    with torch.no_grad():
        outputs = list(module(**_torch({n: trace[n] for n in inputs})))
    args = [torch.from_numpy(trace[n].copy()) for n in inputs]
    with converter_output_quiet(), torch.no_grad():
        program = torch.onnx.export(_Listed(module, inputs, outputs).eval(), (args,), dynamo=True,
                                    opset_version=OPSET, input_names=inputs,
                                    output_names=[piece_output_name(n, inputs) for n in outputs],
                                    dynamic_shapes=(dynamic,), external_data=True, verbose=False)
        remove_graph(path)
        program.save(str(path), external_data=True)
    del program
    return path


def ort_session(path: Path):
    """A plain CPU onnxruntime session, errors only (used by the export checks)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_piece(session, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A piece's outputs by interface name (the '_out' suffix dropped)."""
    inputs = [i.name for i in session.get_inputs()]
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {n: row[n] for n in inputs})
    return {n[:-len(PIECE_OUTPUT_SUFFIX)] if n.endswith(PIECE_OUTPUT_SUFFIX) and n[:-len(PIECE_OUTPUT_SUFFIX)] in inputs
            else n: v for n, v in zip(names, values)}


def token_axis_max(contract: Contract) -> int:
    """Largest T the target graph accepts: the longest prefill or the verify window."""
    return max(max(contract.prefill_lengths), contract.verify_len if contract.drafter is not None else 1)


def target_graph_io(contract: Contract) -> tuple[list[str], list[str]]:
    """Input and output names of the target graph (caches out as kv_output_name)."""
    sig = contract.target_signature(DECODE, 1)
    return [s.name for s in sig.inputs], [onnx_output_name(contract, s.name) for s in sig.outputs]


def _value_infos(contract: Contract, signature: Signature, outputs: bool, token_axis: bool) -> list:
    """ValueInfoProtos of a signature's inputs or outputs (graph names; the token axis named T when dynamic)."""
    import onnx

    out = []
    for spec in signature.outputs if outputs else signature.inputs:
        shape: list = list(spec.shape)
        if token_axis and spec.name in _TOKEN_AXES:
            shape[_TOKEN_AXES[spec.name]] = TOKEN_AXIS
        name = onnx_output_name(contract, spec.name) if outputs else spec.name
        dtype = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))
        out.append(onnx.helper.make_tensor_value_info(name, dtype, shape))
    return out


def _check_graph_names(path: Path, signature_inputs: list[str], outputs: list[str], model: str) -> None:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    got_in, got_out = [i.name for i in graph.input], [o.name for o in graph.output]
    if got_in != signature_inputs or got_out != outputs:
        raise EdgeMtpError(f"The exported {model} graph has inputs {got_in} and outputs {got_out} instead of the "
                           f"contract's {signature_inputs} -> {outputs}; this is an exporter bug, please report it.")


def _check_in_place_writes(path: Path, contract: Contract) -> None:
    """Every cache output must come straight from a ScatterElements on its own input (what ORT runs in place)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    for spec in contract.kv_tensors():
        node = producer.get(kv_output_name(spec.name))
        if node is None or node.op_type != "ScatterElements" or node.input[0] != spec.name:
            raise EdgeMtpError(f"The exported target writes cache {spec.name} with "
                               f"{node.op_type if node else 'no node'} instead of an in-place ScatterElements on "
                               "its input; every decode step would copy the whole cache, please report it.")


def run_onnx(session, contract: Contract, signature: Signature, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run one contract signature on an onnxruntime session; outputs keyed by contract name."""
    names = [s.name for s in signature.outputs]
    values = session.run([onnx_output_name(contract, n) for n in names], inputs)
    return dict(zip(names, values))


@dataclass
class OnnxFormat:
    """Pieces as ONNX graphs in `scratch`, stitched into the bundle's graphs in `folder` (see module doc)."""

    contract: Contract
    folder: Path
    scratch: Path
    on_stage: Callable[[str], None]
    target_path: Path | None = None  # where the target graph goes (default: the bundle's target.onnx)
    models: dict[str, list[str]] = field(default_factory=dict)  # bundle model -> its pieces

    VERB = "exporting"
    FIRST_CHECKED = 0  # every sample, the traced one too
    CACHE_WRITE = "scatter"  # in place in onnxruntime (model/layers.write_cache)
    FP32_GATHER = False  # the drafter looks its candidate rows up (model/drafter.py)

    @classmethod
    @contextmanager
    def open(cls, out: Path, contract: Contract, on_stage: Callable[[str], None]) -> Iterator[OnnxFormat]:
        """The format for one export: the bundle folder written atomically at `out`, a scratch folder next to it."""
        with atomic_directory(out) as work, tempfile.TemporaryDirectory(prefix=".edge-mtp-", dir=out.parent) as scratch:
            yield cls(contract, work, Path(scratch), on_stage)

    # -- one piece ------------------------------------------------------------------------------------------------

    def convert(self, name: str, module: torch.nn.Module, samples: PieceSamples, weights: dict[str, np.ndarray],
                layer: int | None) -> Path:
        """The piece's fp32 graph, its initializers named after the checkpoint `weights` (onnx_stored.name_weights:
        the quantizers name theirs after them, and validate finds each weight there)."""
        self.models.setdefault(name if name in (EMBEDDER, PER_LAYER_EMBEDDER, DRAFTER) else TARGET, []).append(name)
        inputs = [s.name for s in self.contract.drafter_signature().inputs] if name == DRAFTER else None
        path = export_piece(module, samples, self.scratch / f"{name}.onnx", inputs)
        name_weights(path, weights)
        return path

    def quantize(self, name: str, fp32: Path, recipe: str) -> Path:
        """The piece under a uniform recipe (fp32: the piece itself); the drafter goes straight into the bundle."""
        if name == DRAFTER:
            return quantize_graph(fp32, recipe, self.folder / model_file(DRAFTER))
        return fp32 if recipe == "fp32" else quantize_graph(fp32, recipe, self.scratch / f"{name}.{recipe}.onnx")

    def runner(self, path: Path) -> Callable[[str, dict], dict]:
        """Runs a piece graph: (signature, inputs) -> outputs by interface name."""
        session = ort_session(path)
        return lambda signature, row: _run_piece(session, row)

    def name(self, path: Path, weights: dict[str, np.ndarray], recipe: str) -> None:
        """Nothing: the weights were named in the fp32 graph, before the quantizers derived their names from them."""

    size = staticmethod(graph_bytes)

    def remove(self, *paths: Path) -> None:
        """Delete graphs (and their data) no longer needed."""
        for path in paths:
            remove_graph(path)

    # -- stitched graphs ------------------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.target_path if name == TARGET and self.target_path else self.folder / model_file(name)

    def model(self, name: str) -> GraphStitcher:
        """An empty stitched graph, its weights streaming into the graph's data file."""
        path = self._path(name)
        stitcher = GraphStitcher(path.with_name(path.name + ".data"))
        if name == TARGET:
            stitcher.alias(HIDDEN, "embeddings")
        return stitcher

    def join(self, model: GraphStitcher, name: str, piece: Path, rename: dict[str, str] | None = None) -> None:
        """Append a checked piece to the stitched graph, and delete it."""
        model.add(piece, name, rename)
        remove_graph(piece)

    def widen(self, model: GraphStitcher, table: Table, report: PieceReport) -> None:
        """Append a table piece, its whole table quantized in row chunks into the graph's data file."""
        small, width = table.rows.shape
        located = locate_table(table.fp32, table.piece, small, table.rows, report.recipe)
        self.on_stage(f"quantizing the {table.name.replace('_', ' ')} table ({table.vocab} x {width})")
        placed, edit = write_table(located, model.data, table.read_rows, table.vocab)
        model.add(table.piece, table.name, placed=placed, edit=edit)
        report.bytes += sum(p.nbytes for p in placed.values()) * (table.vocab - small) // table.vocab
        report.fp32_bytes += 4 * (table.vocab - small) * width  # the small piece's bytes, grown by the rest
        remove_graph(table.piece)
        remove_graph(table.fp32)

    def finish(self, model: GraphStitcher | Path, name: str) -> Path:
        """Write a stitched graph with the contract's inputs and outputs (a drafter is its piece already)."""
        contract = self.contract
        if name == DRAFTER:
            sig = contract.drafter_signature()
            _check_graph_names(model, [s.name for s in sig.inputs],
                               [onnx_output_name(contract, s.name) for s in sig.outputs], DRAFTER)
            return model
        if name == TARGET:
            self.on_stage("writing the target graph")
            decode = contract.target_signature(DECODE, 1)
            path = model.finish(self._path(TARGET), _value_infos(contract, decode, False, True),
                                _value_infos(contract, decode, True, True),
                                {onnx_output_name(contract, s.name): s.name for s in decode.outputs})
            _check_graph_names(path, *target_graph_io(contract), TARGET)
            _check_in_place_writes(path, contract)
            return path
        signature = contract.embedder() if name == EMBEDDER else contract.per_layer_embedder()
        path = model.finish(self._path(name), _value_infos(contract, signature, False, False),
                            _value_infos(contract, signature, True, False), {o.name: o.name for o in signature.outputs})
        _check_graph_names(path, [s.name for s in signature.inputs], [o.name for o in signature.outputs], name)
        return path

    # -- the bundle -----------------------------------------------------------------------------------------------

    def components(self, reports: dict[str, PieceReport]) -> dict[str, dict]:
        """Per bundle model: the recipe(s) its pieces got, bytes, and the pieces' own reports (no timings)."""
        out = {}
        for model, pieces in self.models.items():
            mine = [reports[p] for p in pieces]
            out[model] = {"recipe": "+".join(sorted({r.recipe for r in mine})),
                          "bytes": graph_bytes(self.folder / model_file(model)),
                          "fp32_bytes": sum(r.fp32_bytes for r in mine),
                          "matmul_weight_bytes": weight_bytes(self.folder / model_file(model))["matmul"],
                          "pieces": {p: {k: v for k, v in asdict(reports[p]).items() if k != "seconds"}
                                     for p in pieces}}
            errors = [r.int4_error for r in mine if r.int4_error is not None]
            if errors:
                out[model]["int4_error"] = max(errors)
        return out

    def write(self, out: Path, paths: dict[str, Path], reports: dict[str, PieceReport], source: TargetSource,
              drafter: Drafter | None, tokenizer: Path, meta: BundleMetadata, quant: str,
              source_assistant: str | Path | None, allow_template_mismatch: bool) -> dict:
        """Write the manifest and tokenizer files next to the graphs and check the bundle end to end; its
        quantization report (the folder is published atomically at `out` when the export ends)."""
        from ..bundle.tokenizer import Tokenizer
        from .bundle_check import bundle_report, enforce
        from .quality import open_backend, report_prompts

        contract, work = self.contract, self.folder
        records = {}
        for model, path in paths.items():
            records[model] = {"file": path.name, "signatures": [s.name for s in signature_names(contract)[model]],
                              "external_data": sorted(p.name for p in work.glob(f"{path.name}.data"))}
        in_names, out_names = target_graph_io(contract)
        records[TARGET].update(token_axis={"name": TOKEN_AXIS, "min": 1, "max": token_axis_max(contract)},
                               inputs=in_names, outputs=out_names,
                               note="one graph for every target signature: prefill_<T> ignores logits/activations")
        self.on_stage("writing bundle")
        shutil.copyfile(tokenizer, work / TOKENIZER_FILE)
        if (source.directory / TOKENIZER_CONFIG).is_file():
            shutil.copyfile(source.directory / TOKENIZER_CONFIG, work / TOKENIZER_CONFIG)
        if meta.chat_template:
            (work / CHAT_TEMPLATE).write_text(meta.chat_template)
        tokenizer_record = {
            "file": TOKENIZER_FILE,
            "config": TOKENIZER_CONFIG if (work / TOKENIZER_CONFIG).is_file() else None,
            "chat_template": CHAT_TEMPLATE if meta.chat_template else None,
            "bos": meta.start_token, "stop_tokens": list(meta.stop_tokens)}
        manifest = build_manifest(contract, records, tokenizer_record, work, quantization=quant)
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
        prompts = report_prompts(Tokenizer(tokenizer.read_text(), meta.start_token, meta.stop_tokens),
                                 contract.context)
        report = bundle_report(lambda: open_backend(work), source, drafter, contract, prompts, on_stage=self.on_stage)
        enforce(report, str(out), exact=quant == "fp32")
        report["components"] = self.components(reports)
        manifest["quantization_report"] = report
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
        read_manifest(work)  # refuse to publish a bundle we cannot read back
        return report

    @staticmethod
    def publish(out: Path, contract: Contract) -> tuple[int, list[dict]]:
        """(bundle bytes, its files) of the published folder."""
        files = read_manifest(out, verify=False)["files"]
        return (sum(f["bytes"] for f in files.values()) + (out / MANIFEST).stat().st_size,
                [{"type": "onnx" if name.endswith((".onnx", ".data")) else "file", "model_type": name,
                  "bytes": f["bytes"]} for name, f in files.items()])


def export_target_graph(target: torch.nn.Module, contract: Contract, path: Path) -> Path:
    """The fp32 dynamic-T target graph of modules in memory, written to `path` (+ .data) by the streamed path."""
    models = build_target(contract.target)
    models.target = target
    models.embedder.embed_tokens = target.embed_tokens  # the tied table the head is read from
    with tempfile.TemporaryDirectory(prefix=".edge-mtp-", dir=path.parent) as scratch:
        fmt = OnnxFormat(contract, path.parent, Path(scratch), lambda s: None, path)
        return StreamedExport(TargetSource(models), None, contract, fmt, "fp32", check=False).target_model()
