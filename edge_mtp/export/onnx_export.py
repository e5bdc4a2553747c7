"""`edge-mtp export --format onnx`: checkpoints -> checked ONNX graphs + manifest in one bundle folder, atomically.

Graphs: `embedder.onnx`, `per_layer_embedder.onnx` (with PLE), `target.onnx`, `drafter.onnx` (with an assistant).
The target is ONE graph with a dynamic token axis T (1 <= T <= max(prefill, G+1)) that serves `prefill_<T>`,
`decode` and `verify`: one weight copy on disk and in memory, one session. Its caches are written with
ScatterElements whose outputs `kv_cache_*_out` are graph outputs, so onnxruntime updates a cache in place when the
same OrtValue is bound as input and output (runtime/backends/ort.py).

One streamed path for every model size, the ONNX twin of export/driver.py: the target is cut into the same pieces
(export.pieces: prelude, one decoder layer at a time, head), each loaded alone from the checkpoint in fp32, exported
with torch.onnx on a dynamic token axis, compared with its PyTorch piece at every signature, quantized
(export/onnx_quantize.py) and appended to the joined graph, whose weights stream into `target.onnx.data`
(export/onnx_stitch.py). Vocabulary tables are exported on a few rows and quantized in row chunks straight into the
data file (export/onnx_tables.py). The finished bundle is then checked end to end against the streamed PyTorch
reference (export/bundle_check.py, as the LiteRT path), whose numbers are the manifest's `quantization_report`.
`quantize_onnx_bundle` quantizes a finished fp32 bundle one weight group at a time (export/onnx_requantize.py)
and measures it against its source.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..bundle.onnx_folder import (CHAT_TEMPLATE, MANIFEST, TOKEN_AXIS, TOKENIZER_CONFIG, TOKENIZER_FILE, build_manifest,
                           contract_from_manifest, model_file, onnx_output_name,
                           read_manifest, tokenizer_info)
from ..checkpoint.reading import swapped
from ..model.contract import (DECODE, DRAFTER, EMBEDDER, PER_LAYER_EMBEDDER, TARGET, VERIFY, Contract, Signature,
                              kv_output_name)
from ..model.drafter import Drafter
from ..model.loading import TargetCheckpoint, TargetModels, TargetSource, load_drafter
from ..util.atomic import atomic_directory
from ..util.errors import EdgeMtpError
from ..util.memory import PeakMemory
from ..util.quiet import converter_output_quiet
from .driver import PieceOrder, PieceReport, Progress, enforce_tolerance, export_resource_errors
from .onnx_quantize import graph_bytes, quantize_graph, remove_graph, weight_bytes
from .onnx_requantize import requantize_graph
from .onnx_stitch import PIECE_OUTPUT_SUFFIX, GraphStitcher
from .onnx_stored import name_weights
from .onnx_tables import HEAD, locate_table, write_table
from .options import (DEFAULT_CONTEXT, DEFAULT_DRAFT_LEN, DEFAULT_PREFILL, DEFAULT_RECIPE, ONNX, check_context,
                      check_export_options, check_quantize_options, resolve_recipe)
from .pieces import HIDDEN, Head, LayerPiece, PieceInputs, PieceSamples, Prelude, layer_rename
from .pipeline import ExportSummary, _signature_names, tokenizer_and_metadata
from .quantize import mixed_choice, relative_error
from .signatures import SignatureModule, compare_outputs, sample_inputs
from .tables import small_vocab

OPSET = 20
SEEDS = (0, 100, 101)  # seed 0 traces; every seed checks
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


def ort_session(path: Path, threads: int | None = None):
    """A plain CPU onnxruntime session (used by the export checks)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_piece(session, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A piece's outputs by interface name (the '_out' suffix dropped)."""
    inputs = [i.name for i in session.get_inputs()]
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {n: row[n] for n in inputs})
    return {n[:-len(PIECE_OUTPUT_SUFFIX)] if n.endswith(PIECE_OUTPUT_SUFFIX) and n[:-len(PIECE_OUTPUT_SUFFIX)] in inputs
            else n: v for n, v in zip(names, values)}


def check_piece(path: Path, module: torch.nn.Module, samples: PieceSamples) -> dict[str, dict]:
    """Compare a piece graph with its PyTorch module on every signature's inputs; worst error per output."""
    session = ort_session(path)
    report: dict[str, dict] = {}
    for signature, rows in samples.by_signature.items():
        worst: dict[str, dict[str, float]] = {}
        for row in rows:
            with torch.no_grad():
                want = {k: v.numpy() for k, v in module(**_torch(row)).items()}
            for name, r in compare_outputs(_run_piece(session, row), want).items():
                if name not in worst or r["relative"] > worst[name]["relative"]:
                    worst[name] = r
        report[signature] = worst
    return report


def _piece_error(fp32: Path, quantized: Path, samples: PieceSamples) -> float:
    """Relative error of a quantized piece's first non-cache output against its fp32 graph (checking seeds)."""
    reference, candidate = ort_session(fp32), ort_session(quantized)
    worst = 0.0
    for rows in samples.by_signature.values():
        for row in rows[1:]:
            want, got = _run_piece(reference, row), _run_piece(candidate, row)
            key = next(k for k in want if "cache" not in k)
            worst = max(worst, relative_error(got, want, key))
    return worst


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


class StreamedOnnxExport(PieceOrder):
    """Builds the bundle's ONNX graphs from a target source, piece by piece (see module doc)."""

    def __init__(self, source: TargetSource, drafter: Drafter | None, contract: Contract, out: Path, scratch: Path,
                 quant: str, check: bool = True, on_stage: Callable[[str], None] = lambda s: None,
                 on_progress: Progress = lambda what, done, total: None):
        self.source, self.drafter, self.contract = source, drafter, contract
        self.out, self.scratch, self.quant, self.check = out, scratch, quant, check
        self.on_stage, self.on_progress = on_stage, on_progress
        self.reports: dict[str, PieceReport] = {}
        self.models: dict[str, list[str]] = {}  # bundle model -> its pieces
        self._done = 0

    # -- one piece: export, check, quantize ---------------------------------------------------------------------------

    def _piece(self, name: str, module: torch.nn.Module, samples: PieceSamples, model: str,
               weights: dict[str, torch.Tensor], inputs: list[str] | None = None, out: Path | None = None,
               keep_fp32: bool = False) -> Path:
        """Export a piece, name the initializers of its checkpoint `weights` after them (onnx_stored.name_weights:
        validate finds each weight there), check it against PyTorch, quantize it (to `out` when given); returns the
        graph to use (its fp32 export stays at scratch/<name>.onnx with `keep_fp32`)."""
        start = time.time()
        fp32 = export_piece(module, samples, self.scratch / f"{name}.onnx", inputs)
        name_weights(fp32, {n: t.detach().float().numpy() for n, t in weights.items() if t.is_floating_point()})
        worst = enforce_tolerance(name, check_piece(fp32, module, samples)) if self.check else 0.0
        recipe, error, int4_error = self.quant, None, None
        if recipe == "mixed":
            recipe, int4_error = mixed_choice(name, lambda: self._int4_error(fp32, samples))
        path = out or self.scratch / f"{name}.{recipe}.onnx"
        if recipe == "fp32" and out is None:
            path = fp32
        else:
            quantize_graph(fp32, recipe, path)
            if recipe != "fp32":
                error = _piece_error(fp32, path, samples)
        self.reports[name] = PieceReport(recipe, worst, error, graph_bytes(path), graph_bytes(fp32),
                                         time.time() - start, int4_error)
        self.models.setdefault(model, []).append(name)
        if path != fp32 and not keep_fp32:
            remove_graph(fp32)
        gc.collect()
        return path

    def _int4_error(self, fp32: Path, samples: PieceSamples) -> float:
        trial = quantize_graph(fp32, "int4", self.scratch / "trial.onnx")
        try:
            return _piece_error(fp32, trial, samples)
        finally:
            remove_graph(trial)

    # -- the target ---------------------------------------------------------------------------------------------------

    def target_model(self, path: Path | None = None) -> Path:
        """prelude + layers + head, joined into one dynamic-T graph serving every target signature (+ its .data)."""
        spec, src, contract = self.contract.target, self.source, self.contract
        path = path or self.out / model_file(TARGET)
        stitcher = GraphStitcher(path.with_name(path.name + ".data"))
        stitcher.alias(HIDDEN, "embeddings")
        self.on_stage("exporting the target layer by layer")
        parts = ("per_layer_model_projection", "per_layer_projection_norm") if spec.ple_dim else ()
        for part in parts:
            src.load(TARGET, part)
        prelude = Prelude(src.models.target)
        inputs = PieceInputs(contract, prelude, SEEDS)
        piece = self._piece("prelude", prelude, inputs.prelude(), TARGET,
                            dict(prelude.named_parameters()) | dict(prelude.named_buffers()))
        stitcher.add(piece, "prelude")
        remove_graph(piece)
        for part in parts:
            src.release(TARGET, part)
        self._step("prelude")
        available = inputs.available()
        for i in range(spec.num_layers):
            src.load(TARGET, f"layers.{i}.")
            piece = LayerPiece(src.models.target, i, available)
            done = self._piece(f"layer_{i}", piece, inputs.layer(piece), TARGET,
                               {f"layers.{i}.{n.removeprefix('layer.')}": t for n, t in piece.state_dict().items()})
            stitcher.add(done, f"layer_{i}", layer_rename(src.models.target, i, piece))
            remove_graph(done)
            src.release(TARGET, f"layers.{i}.")
            self._step(f"layer {i + 1}/{spec.num_layers}")
        self._head(stitcher, inputs)
        self.on_stage("writing the target graph")
        decode = contract.target_signature(DECODE, 1)
        names = [s.name for s in decode.outputs]
        path = stitcher.finish(path, _value_infos(contract, decode, False, True),
                               _value_infos(contract, decode, True, True),
                               {onnx_output_name(contract, n): n for n in names})
        _check_graph_names(path, *target_graph_io(contract), TARGET)
        _check_in_place_writes(path, contract)
        return path

    def _dimensions(self) -> set[int]:
        c, s = self.contract, self.contract.target
        return {c.context, c.verify_len, *c.prefill_lengths, s.hidden_size, s.num_layers, s.ple_dim,
                s.num_layers * s.ple_dim, s.head_dim, s.global_head_dim, s.intermediate_size * 2, s.intermediate_size,
                s.num_kv_heads, s.num_heads, *{s.layer_intermediate_size(i) for i in range(s.num_layers)}}

    def _table(self, name: str, module: torch.nn.Module, holder: torch.nn.Module, local: str, owner: str,
               samples: PieceSamples, model: str, stitcher: GraphStitcher, weights: dict[str, torch.Tensor]) -> None:
        """A table's piece on a few rows, then the whole table quantized in row chunks into the stitched graph;
        `weights`: the piece's other checkpoint weights."""
        src = self.source
        entry = src.entry(local, owner)
        vocab, width = entry.shape
        small = small_vocab(self._dimensions(), vocab)
        rows = src.rows(entry, 0, small)
        with swapped(holder, local, rows):
            path = self._piece(name, module, samples, model, weights | {local: rows}, keep_fp32=True)
        fp32 = self.scratch / f"{name}.onnx"
        table = locate_table(fp32, path, small, rows.numpy(), self.reports[name].recipe)
        self.on_stage(f"quantizing the {name.replace('_', ' ')} table ({vocab} x {width})")
        placed, edit = write_table(table, stitcher.data, lambda a, b: src.rows(entry, a, b).numpy(), vocab)
        stitcher.add(path, name, placed=placed, edit=edit)
        report = self.reports[name]  # the small piece's bytes, grown by the rest of the table
        report.bytes += sum(p.nbytes for p in placed.values()) * (vocab - small) // vocab
        report.fp32_bytes += 4 * (vocab - small) * width
        remove_graph(path)
        remove_graph(fp32)

    def _head(self, stitcher: GraphStitcher, inputs: PieceInputs) -> None:
        """The LM head, exported on a few rows of the tied embedding and widened to the whole vocabulary."""
        self.source.load(TARGET, "norm")
        target = self.source.models.target
        self._table(HEAD, Head(target), target, "embed_tokens.weight", TARGET, inputs.head(), TARGET, stitcher,
                    {"norm.weight": target.norm.weight})
        self.source.release(TARGET, "norm")
        self._step(HEAD)

    # -- embedders and drafter ----------------------------------------------------------------------------------------

    def embedder(self, name: str) -> Path:
        """The (per-layer) embedder graph: exported on a few rows, its table quantized in chunks and widened."""
        signature = self.contract.embedder() if name == EMBEDDER else self.contract.per_layer_embedder()
        holder = self.source.modules[name]
        local = "embed_tokens.weight" if name == EMBEDDER else "embed_tokens_per_layer.weight"
        rng = np.random.default_rng(5)
        ids = min(97, self.contract.target.vocab_size)  # within the small table
        samples = PieceSamples({signature.name: [{"token_ids": rng.integers(0, ids, (1, 1)).astype(np.int32)}
                                                 for _ in SEEDS]})
        self.on_stage(f"exporting the {name.replace('_', ' ')}")
        stitcher = GraphStitcher(self.out / f"{model_file(name)}.data")
        self._table(name, SignatureModule(holder, signature), holder, local, name, samples, name, stitcher, {})
        path = stitcher.finish(self.out / model_file(name), _value_infos(self.contract, signature, False, False),
                               _value_infos(self.contract, signature, True, False),
                               {o.name: o.name for o in signature.outputs})
        _check_graph_names(path, [s.name for s in signature.inputs], [o.name for o in signature.outputs], name)
        self._step(name.replace("_", " "))
        return path

    def drafter_model(self) -> Path:
        """The MTP drafter, exported whole (78 M parameters), checked and quantized."""
        self.on_stage("exporting the MTP drafter")
        sig = self.contract.drafter_signature()
        module = SignatureModule(self.drafter, sig, ("activations", "input_pos", "mask"))
        samples = PieceSamples({sig.name: [sample_inputs(sig, self.contract, seed=s) for s in SEEDS]})
        out = self.out / model_file(DRAFTER)
        path = self._piece(DRAFTER, module, samples, DRAFTER, dict(self.drafter.named_parameters()),
                           [s.name for s in sig.inputs], out=out)
        _check_graph_names(path, [s.name for s in sig.inputs],
                           [onnx_output_name(self.contract, s.name) for s in sig.outputs], DRAFTER)
        self._step("drafter")
        return path

    def components(self) -> dict[str, dict]:
        """Per bundle model: the recipe(s) its pieces got, bytes, and the pieces' own reports (no timings)."""
        out = {}
        for model, pieces in self.models.items():
            reports = [self.reports[p] for p in pieces]
            out[model] = {"recipe": "+".join(sorted({r.recipe for r in reports})),
                          "bytes": graph_bytes(self.out / model_file(model)),
                          "fp32_bytes": sum(r.fp32_bytes for r in reports),
                          "matmul_weight_bytes": weight_bytes(self.out / model_file(model))["matmul"],
                          "pieces": {p: {k: v for k, v in asdict(self.reports[p]).items() if k != "seconds"}
                                     for p in pieces}}
            errors = [r.int4_error for r in reports if r.int4_error is not None]
            if errors:
                out[model]["int4_error"] = max(errors)
        return out


def export_target_graph(target: torch.nn.Module, contract: Contract, path: Path) -> Path:
    """The fp32 dynamic-T target graph of modules in memory, written to `path` (+ .data) by the streamed path."""
    from ..model.loading import build_target

    models = build_target(contract.target)
    models.target = target
    models.embedder.embed_tokens = target.embed_tokens  # the tied table the head is read from
    with tempfile.TemporaryDirectory(prefix=".edge-mtp-", dir=path.parent) as scratch:
        job = StreamedOnnxExport(TargetSource(models), None, contract, path.parent, Path(scratch), "fp32", check=False)
        return job.target_model(path)


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
        from ..bundle.tokenizer import Tokenizer
        from .quality import quantization_report, report_prompts

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


def export_onnx(target_dir: str | Path, assistant_dir: str | Path | None, out_dir: str | Path, *,
                draft_len: int = DEFAULT_DRAFT_LEN, context: int = DEFAULT_CONTEXT,
                prefill: tuple[int, ...] = DEFAULT_PREFILL, check: bool = True, quant: str = DEFAULT_RECIPE,
                on_stage: Callable[[str], None] = lambda s: None,
                on_progress: Progress = lambda what, done, total: None) -> ExportSummary:
    """Export a target (and its assistant) to an ONNX bundle folder `out_dir`, streaming the checkpoint piece by
    piece; every piece is checked against PyTorch (`check`) and the bundle against the streamed reference."""
    out = Path(out_dir)
    check_export_options(out, ONNX, draft_len, context, tuple(prefill), quant)
    check_context(target_dir, context, tuple(prefill))
    source = TargetCheckpoint(target_dir)
    drafter = load_drafter(assistant_dir, source.spec) if assistant_dir is not None else None
    return export_onnx_models(source, drafter, out, draft_len=draft_len, context=context, prefill=prefill,
                              check=check, quant=quant, on_stage=on_stage, on_progress=on_progress)


def export_onnx_models(source: TargetSource | TargetModels, drafter: Drafter | None, out: Path, *,
                       draft_len: int = DEFAULT_DRAFT_LEN, context: int = DEFAULT_CONTEXT,
                       prefill: tuple[int, ...] = DEFAULT_PREFILL, check: bool = True, quant: str = DEFAULT_RECIPE,
                       on_stage: Callable[[str], None] = lambda s: None,
                       on_progress: Progress = lambda what, done, total: None) -> ExportSummary:
    """Export a target source (a checkpoint opened for streaming, or modules in memory) to an ONNX bundle `out`."""
    from ..bundle.tokenizer import Tokenizer
    from .bundle_check import bundle_report, enforce
    from .quality import open_backend, report_prompts

    start = time.time()
    out = Path(out)
    check_export_options(out, ONNX, draft_len, context, tuple(prefill), quant)
    if isinstance(source, TargetModels):
        source = TargetSource(source)
    quant = resolve_recipe(quant, source.spec)
    contract = Contract(source.spec, drafter.spec if drafter else None, context, draft_len, tuple(sorted(prefill)))
    tokenizer, meta = tokenizer_and_metadata(source.directory)
    target = source.models.target
    previous_write, target.cache_write = target.cache_write, "scatter"  # in place in onnxruntime (layers.write_cache)
    memory, stages = PeakMemory(), []

    def stage(text: str) -> None:
        stages.append(text)
        on_stage(text)

    try:
        with memory, export_resource_errors(out), atomic_directory(out) as work, \
                tempfile.TemporaryDirectory(prefix=".edge-mtp-", dir=out.parent) as scratch:
            job = StreamedOnnxExport(source, drafter, contract, work, Path(scratch), quant, check, stage, on_progress)
            paths = job.run()
            records = {}
            for model, path in paths.items():
                records[model] = {"file": path.name, "signatures": [s.name for s in _signature_names(contract)[model]],
                                  "external_data": sorted(p.name for p in work.glob(f"{path.name}.data"))}
            in_names, out_names = target_graph_io(contract)
            records[TARGET].update(token_axis={"name": TOKEN_AXIS, "min": 1, "max": token_axis_max(contract)},
                                   inputs=in_names, outputs=out_names,
                                   note="one graph for every target signature: prefill_<T> ignores logits/activations")
            stage("writing bundle")
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
            report = bundle_report(lambda: open_backend(work), source, drafter, contract, prompts, on_stage=stage)
            enforce(report, str(out), exact=quant == "fp32")
            report["components"] = job.components()
            manifest["quantization_report"] = report
            (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
            read_manifest(work)  # refuse to publish a bundle we cannot read back
    finally:
        target.cache_write = previous_write
    published = read_manifest(out, verify=False)
    files = published["files"]
    return ExportSummary(
        out=str(out), bytes=sum(f["bytes"] for f in files.values()) + (out / MANIFEST).stat().st_size,
        sections=[{"type": "onnx" if name.endswith((".onnx", ".data")) else "file", "model_type": name,
                   "bytes": f["bytes"]} for name, f in files.items()],
        signatures={u: [s.name for s in sigs] for u, sigs in _signature_names(contract).items()},
        checks={name: r.fp32_error for name, r in job.reports.items()}, wall_seconds=time.time() - start,
        peak_rss_mib=memory.peak_mib, stages=stages, quantization=report, recipe=quant)
