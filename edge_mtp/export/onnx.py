"""`edge-mtp export --format onnx`: checkpoints -> checked ONNX graphs + manifest in one bundle folder, atomically.

Graphs: `embedder.onnx`, `per_layer_embedder.onnx` (with PLE), `target.onnx`, `drafter.onnx` (with an assistant).
The target is ONE graph with a dynamic token axis T (1 <= T <= max(prefill, G+1)) that serves `prefill_<T>`,
`decode` and `verify`: one weight copy on disk and in memory, one session. Its caches are written with
ScatterElements whose outputs `kv_cache_*_out` are graph outputs, so onnxruntime updates a cache in place when the
same OrtValue is bound as input and output (runtime/backends/onnx.py). Every graph is compared with the PyTorch
module it came from, at every signature, before the bundle is published.

Quantization (--quant, the LiteRT recipe names; export/onnx_quantize.py) runs graph by graph right after each graph
is checked; the fp32 graphs wait in a temporary folder as the twin the quantized bundle is measured against, and the
manifest records that `quantization_report`. `quantize_onnx_bundle` does the same to a finished fp32 bundle.
"""

from __future__ import annotations

import contextlib
import gc
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..atomic import atomic_directory, writable_parent
from ..contract import (ACTIVATIONS, DECODE, DRAFTER, EMBEDDER, LOGITS, PER_LAYER_EMBEDDER, TARGET, VERIFY,
                        Contract, Signature, kv_output_name)
from ..errors import EdgeMtpError
from ..model.loading import load_drafter, load_target
from ..quiet import converter_output_quiet
from .driver import enforce_tolerance
from ..bundle.onnx import (CHAT_TEMPLATE, MANIFEST, TOKEN_AXIS, TOKENIZER_CONFIG, TOKENIZER_FILE, build_manifest,
                          contract_from_manifest, is_onnx_bundle, model_file, onnx_output_name,
                          read_manifest, tokenizer_info)
from .pipeline import (DEFAULT_CONTEXT, DEFAULT_DRAFT_LEN, DEFAULT_PREFILL, ExportSummary,
                       _signature_names, tokenizer_files)
from .onnx_quantize import check_onnx_recipe, graph_bytes, move_graph, quantize_graph, weight_bytes
from .quantize import mixed_choice, relative_error
from .signatures import ExportUnit, compare_outputs, export_units, run_reference, sample_inputs

OPSET = 20


class _Positional(torch.nn.Module):
    """A signature module called with positional tensors in contract order; returns outputs in contract order."""

    def __init__(self, module: torch.nn.Module, signature: Signature):
        super().__init__()
        self.module = module
        self.input_names = tuple(s.name for s in signature.inputs)
        self.output_names = tuple(s.name for s in signature.outputs)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.module(**dict(zip(self.input_names, args)))
        return tuple(out[n] for n in self.output_names)


class _TargetGraph(torch.nn.Module):
    """The target with its per-token inputs and its caches as two list arguments (what dynamic_shapes can match:
    torch.onnx turns tuples into lists, so a *varargs cache tuple never matches its spec).

    Always returns logits, activations and every updated cache, whatever T is.
    """

    def __init__(self, target: torch.nn.Module, contract: Contract):
        super().__init__()
        self.target = target
        self.with_ple = bool(contract.target.ple_dim)
        self.kv_names = tuple(s.name for s in contract.kv_tensors())

    def forward(self, inputs: list[torch.Tensor], kv: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.with_ple:
            embeddings, ple, input_pos, mask = inputs
        else:
            (embeddings, input_pos, mask), ple = inputs, None
        out = self.target(embeddings, ple, input_pos, mask, **dict(zip(self.kv_names, kv)))
        return (out[LOGITS], out[ACTIVATIONS], *(out[n] for n in self.kv_names))


def token_axis_max(contract: Contract) -> int:
    """Largest T the target graph accepts: the longest prefill or the verify window."""
    return max(max(contract.prefill_lengths), contract.verify_len if contract.drafter is not None else 1)


def target_graph_io(contract: Contract) -> tuple[list[str], list[str]]:
    """Input and output names of the target graph (caches out as kv_output_name)."""
    sig = contract.target_signature(DECODE, 1)
    return [s.name for s in sig.inputs], [onnx_output_name(contract, s.name) for s in sig.outputs]


def export_target_graph(target: torch.nn.Module, contract: Contract, path: Path) -> Path:
    """Trace the target once with a dynamic token axis and write `path` (+ `path`.data)."""
    tmax = token_axis_max(contract)
    sig = contract.target_signature(DECODE, tmax)
    sample = {k: torch.from_numpy(v) for k, v in sample_inputs(sig, contract, seed=0).items()}
    kv_names = [s.name for s in contract.kv_tensors()]
    in_names, out_names = target_graph_io(contract)
    per_token = [n for n in in_names if n not in kv_names]
    T = torch.export.Dim(TOKEN_AXIS, min=1, max=tmax)
    axis = {"embeddings": 1, "per_layer_embeddings": 1, "input_pos": 0, "mask": 2}
    dynamic = ([{axis[n]: T} for n in per_token], [None] * len(kv_names))
    args = ([sample[n] for n in per_token], [sample[n] for n in kv_names])
    with converter_output_quiet(), torch.no_grad():
        program = torch.onnx.export(_TargetGraph(target, contract).eval(), args, dynamo=True, opset_version=OPSET,
                                    input_names=in_names, output_names=out_names, dynamic_shapes=dynamic,
                                    external_data=True, verbose=False)
        program.save(str(path), external_data=True)
    del program
    return path


def export_static_graph(signature: Signature, module: torch.nn.Module, contract: Contract, path: Path) -> Path:
    """Trace a fixed-shape signature (embedders, drafter) and write `path` (+ `path`.data)."""
    sample = sample_inputs(signature, contract, seed=0)
    args = tuple(torch.from_numpy(sample[s.name]) for s in signature.inputs)
    with converter_output_quiet(), torch.no_grad():
        program = torch.onnx.export(_Positional(module, signature).eval(), args, dynamo=True, opset_version=OPSET,
                                    input_names=[s.name for s in signature.inputs],
                                    output_names=[onnx_output_name(contract, s.name) for s in signature.outputs],
                                    external_data=True, verbose=False)
        program.save(str(path), external_data=True)
    del program
    return path


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


def export_unit(unit: ExportUnit, contract: Contract, path: Path) -> Path:
    """Write one bundle model: the dynamic-T target graph or a static graph, and check its tensor names."""
    if unit.name == TARGET:
        export_target_graph(unit.signatures[0][1].model, contract, path)
        _check_graph_names(path, *target_graph_io(contract), unit.name)
        _check_in_place_writes(path, contract)
    else:
        (signature, module), = unit.signatures
        export_static_graph(signature, module, contract, path)
        _check_graph_names(path, [s.name for s in signature.inputs],
                           [onnx_output_name(contract, s.name) for s in signature.outputs], unit.name)
    return path


def ort_session(path: Path, threads: int | None = None):
    """A plain CPU onnxruntime session (used by the export checks)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, contract: Contract, signature: Signature, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run one contract signature on an onnxruntime session; outputs keyed by contract name."""
    names = [s.name for s in signature.outputs]
    values = session.run([onnx_output_name(contract, n) for n in names], inputs)
    return dict(zip(names, values))


def check_unit(unit: ExportUnit, contract: Contract, path: Path, seeds: int = 2) -> dict[str, dict]:
    """Compare every signature the graph serves with its PyTorch module on random inputs; worst error per output."""
    session = ort_session(path)
    report: dict[str, dict] = {}
    for signature, module in unit.signatures:
        worst: dict[str, dict[str, float]] = {}
        for seed in range(seeds):
            inputs = sample_inputs(signature, contract, seed=100 + seed)
            got = run_onnx(session, contract, signature, inputs)
            for name, row in compare_outputs(got, run_reference(module, inputs)).items():
                if name not in worst or row["relative"] > worst[name]["relative"]:
                    worst[name] = row
        report[signature.name] = worst
    del session
    return report


def _sensitivity_signature(contract: Contract, model: str) -> Signature:
    """The signature a component's 4-bit sensitivity is measured on: verify for the target, else its only one."""
    if model == TARGET:
        return contract.target_signature(VERIFY, contract.verify_len) if contract.drafter is not None else \
            contract.target_signature(DECODE, 1)
    return {EMBEDDER: contract.embedder, PER_LAYER_EMBEDDER: contract.per_layer_embedder,
            DRAFTER: contract.drafter_signature}[model]()


class _Quantization:
    """Applies a recipe graph by graph (each quantized right after it is written, nothing else held) and records
    what each component got; `report` then measures the quantized bundle against its fp32 twin."""

    def __init__(self, recipe: str, contract: Contract, scratch: Path):
        self.recipe, self.contract, self.scratch = recipe, contract, scratch
        self.components: dict[str, dict] = {}

    def apply(self, model: str, fp32: Path, path: Path) -> None:
        """Write `path` (+ .data): the fp32 graph `fp32` under the recipe ('mixed' decides per component)."""
        error = None
        if self.recipe == "mixed":
            chosen, error = mixed_choice(model, lambda: self._int4_error(model, fp32))
        else:
            chosen = self.recipe
        quantize_graph(fp32, chosen, path)
        gc.collect()
        record = {"recipe": chosen, "bytes": graph_bytes(path), "fp32_bytes": graph_bytes(fp32),
                  "matmul_weight_bytes": weight_bytes(path)["matmul"],
                  "fp32_matmul_weight_bytes": weight_bytes(fp32)["matmul"]}
        if error is not None:
            record["int4_error"] = error
        self.components[model] = record

    def _int4_error(self, model: str, fp32: Path) -> float:
        """Relative error of the component's main output under int4, on random inputs (the LiteRT rule)."""
        trial_dir = self.scratch / "trial"
        trial_dir.mkdir(exist_ok=True)
        trial = quantize_graph(fp32, "int4", trial_dir / fp32.name)
        try:
            signature = _sensitivity_signature(self.contract, model)
            inputs = sample_inputs(signature, self.contract, seed=7)
            key = next(o.name for o in signature.outputs if not o.name.startswith("kv_cache"))
            want = run_onnx(ort_session(fp32), self.contract, signature, inputs)
            got = run_onnx(ort_session(trial), self.contract, signature, inputs)
            return relative_error(got, want, key)
        finally:
            shutil.rmtree(trial_dir, ignore_errors=True)
            gc.collect()

    def report(self, bundle: Path, manifest: dict, fp32_bundle: Path) -> dict:
        """The quantization report of the (manifest-complete) bundle folder against the fp32 bundle folder."""
        from ..bundle.tokenizer import Tokenizer
        from ..checks.quality import quantization_report, report_prompts

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
                         on_stage: Callable[[str], None] = lambda s: None) -> dict:
    """Quantize a finished fp32 ONNX bundle folder into a new bundle folder (no re-export), graph by graph, and
    measure it against the source; returns the new manifest (with its quantization_report)."""
    src, out = Path(src_dir), Path(out_dir)
    check_onnx_recipe(quant)
    source = read_manifest(src)
    if source.get("quantization", "fp32") != "fp32":
        raise EdgeMtpError(f"{src} is already quantized ({source['quantization']}); quantize an fp32 bundle.")
    if out.resolve() == src.resolve():
        raise EdgeMtpError("Write the quantized bundle to another folder; the fp32 source is measured against.")
    _prepare_out(out)
    contract = contract_from_manifest(source, str(src / MANIFEST))
    records = json.loads(json.dumps(source["models"]))
    with atomic_directory(out) as work:
        quantization = _Quantization(quant, contract, work)
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


def _prepare_out(out: Path) -> None:
    if out.suffix == ".litertlm":
        raise EdgeMtpError(f"Output {out} names a .litertlm file; an ONNX bundle is a folder (use --format litert "
                           "for a .litertlm).")
    if out.exists() and not out.is_dir():
        raise EdgeMtpError(f"Output {out} is a file; an ONNX bundle is a folder, choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not is_onnx_bundle(out):
        raise EdgeMtpError(f"Output folder {out} is not empty and is not an edge-mtp ONNX bundle; choose an empty "
                           "or new folder so nothing of yours is overwritten.")
    writable_parent(out)


def export_onnx(target_dir: str | Path, assistant_dir: str | Path | None, out_dir: str | Path, *,
                draft_len: int = DEFAULT_DRAFT_LEN, context: int = DEFAULT_CONTEXT,
                prefill: tuple[int, ...] = DEFAULT_PREFILL, check: bool = True, quant: str = "fp32",
                on_stage: Callable[[str], None] = lambda s: None) -> ExportSummary:
    """Export a target (and its assistant) to an ONNX bundle folder `out_dir`; every graph is checked numerically."""
    start = time.time()
    out = Path(out_dir)
    if draft_len < 1:
        raise EdgeMtpError("--draft-len must be at least 1.")
    check_onnx_recipe(quant)
    _prepare_out(out)
    stages: list[str] = []

    def stage(text: str) -> None:
        stages.append(text)
        on_stage(text)

    stage("loading checkpoints")
    models = load_target(target_dir)
    drafter = load_drafter(assistant_dir, models.spec) if assistant_dir is not None else None
    tokenizer, meta = tokenizer_files(models.path)
    if max(prefill) > context:
        raise EdgeMtpError(f"Prefill length {max(prefill)} exceeds the context {context}.")
    contract = Contract(models.spec, drafter.spec if drafter else None, context, draft_len, tuple(sorted(prefill)))
    models.target.cache_write = "scatter"  # ScatterElements: in place in onnxruntime (layers.write_cache)
    checks: dict[str, float] = {}
    model_records: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(atomic_directory(out))
        quantization = None
        if quant != "fp32":
            fp32_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".edge-mtp-", dir=out.parent)))
            quantization = _Quantization(quant, contract, fp32_dir)
        for unit in export_units(models, drafter, contract):
            path = work / model_file(unit.name)
            stage(f"exporting {unit.name}: {', '.join(s.name for s, _ in unit.signatures)}")
            export_unit(unit, contract, path)
            gc.collect()
            if check:
                stage(f"checking {unit.name} against PyTorch")
                checks[unit.name] = enforce_tolerance(unit.name, check_unit(unit, contract, path))
            if quantization is not None:
                stage(f"quantizing {unit.name} ({quant})")
                fp32 = move_graph(path, fp32_dir / path.name)  # kept as the reference twin
                quantization.apply(unit.name, fp32, path)
            record = {"file": path.name, "signatures": [s.name for s, _ in unit.signatures],
                      "external_data": sorted(p.name for p in work.glob(f"{path.name}.data"))}
            if unit.name == TARGET:
                in_names, out_names = target_graph_io(contract)
                record.update(token_axis={"name": TOKEN_AXIS, "min": 1, "max": token_axis_max(contract)},
                              inputs=in_names, outputs=out_names,
                              note="one graph for every target signature: prefill_<T> ignores logits/activations")
            model_records[unit.name] = record
        stage("writing bundle")
        shutil.copyfile(tokenizer, work / TOKENIZER_FILE)
        if (models.path / TOKENIZER_CONFIG).is_file():
            shutil.copyfile(models.path / TOKENIZER_CONFIG, work / TOKENIZER_CONFIG)
        if meta.chat_template:
            (work / CHAT_TEMPLATE).write_text(meta.chat_template)
        tokenizer_record = {
            "file": TOKENIZER_FILE,
            "config": TOKENIZER_CONFIG if (work / TOKENIZER_CONFIG).is_file() else None,
            "chat_template": CHAT_TEMPLATE if meta.chat_template else None,
            "bos": meta.start_token, "stop_tokens": list(meta.stop_tokens)}
        manifest = build_manifest(contract, model_records, tokenizer_record, work, quantization=quant)
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if quantization is not None:
            stage("measuring the quantization cost against fp32")
            _copy_tokenizer(work, fp32_dir)
            twin = build_manifest(contract, model_records, tokenizer_record, fp32_dir, quantization="fp32")
            (fp32_dir / MANIFEST).write_text(json.dumps(twin, indent=1))
            manifest["quantization_report"] = quantization.report(work, manifest, fp32_dir)
            (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
        read_manifest(work)  # refuse to publish a bundle we cannot read back
    published = read_manifest(out, verify=False)
    files = published["files"]
    return ExportSummary(
        out=str(out), bytes=sum(f["bytes"] for f in files.values()) + (out / MANIFEST).stat().st_size,
        sections=[{"type": "onnx" if name.endswith((".onnx", ".data")) else "file", "model_type": name,
                   "bytes": f["bytes"]} for name, f in files.items()],
        signatures={u: [s.name for s in sigs] for u, sigs in _signature_names(contract).items()},
        checks=checks, wall_seconds=time.time() - start,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, stages=stages,
        quantization=published.get("quantization_report"))
