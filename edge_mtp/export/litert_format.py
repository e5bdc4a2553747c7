"""The LiteRT format of the export driver: converts, checks, quantizes and joins pieces into .tflite models, and
writes them, checked end to end, into one .litertlm bundle.

A decoder layer kind is converted once with placeholder weights (a template, cached across exports by
export.template_cache) and every layer of the kind is that graph refilled with its own weights. A table piece's
few rows are widened to the whole vocabulary in row chunks (export.tables); the LM head reuses the embedder's very
bytes when it is tied to it (the bundle stores them once, bundle.litertlm).
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..bundle.litertlm import BundleMetadata, read_litertlm, source_files, write_litertlm
from ..bundle.tokenizer import Tokenizer
from ..checkpoint.chat_template import checkpoint_specials, fit_template
from ..checkpoint.locate import resolve_checkpoint
from ..checkpoint.reading import assign, swapped
from ..checkpoint.spec import spec_to_dict
from ..formats.tflite import read_tflite
from ..model.contract import DRAFTER, EMBEDDER, PER_LAYER_EMBEDDER, TARGET, Contract
from ..model.drafter import Drafter
from ..model.loading import TargetSource
from ..util.atomic import atomic_file
from ..util.errors import EdgeMtpError
from . import template_cache
from .bundle_check import enforce, litert_bundle_report
from .driver import TOLERANCE, PieceReport, Table
from .joiner import GraphJoiner, WeightSlot, locate_weights, refill_weights
from .litert import TfliteRunner, convert_module
from .pieces import HIDDEN, HEAD, LayerPiece, PieceSamples, layer_kind
from .quantize import component_recipe, quantize_file
from .signatures import SignatureModule, run_reference
from .stored import converter_folds, name_weights
from .tables import QuantizedTable, check_format, find_table, folded_factor, widen

MANIFEST_VERSION = 1
GALLERY_SAMPLING = {"topK": 64, "topP": 0.95, "temperature": 1.0}  # Google's Gemma 4 entries (allowlist 1.0.13+)
GALLERY_MAX_TOKENS = 4000


@dataclass
class Template:
    """A layer kind's conversion with placeholder weights, and where each weight sits in it (None: convert each)."""

    path: Path
    slots: dict[str, WeightSlot] | None


@dataclass
class LitertFormat:
    """Pieces as .tflite files in `work`, joined into the bundle's models (see module doc)."""

    contract: Contract
    work: Path
    on_stage: Callable[[str], None]
    templates: dict[tuple, Template] = field(default_factory=dict)
    embedding: QuantizedTable | None = None  # the embedder's table, kept for the tied LM head
    widened: dict[str, tuple[Table, QuantizedTable, PieceReport]] = field(default_factory=dict)

    VERB = "converting"
    FIRST_CHECKED = 1  # the sample a piece was traced on is not checked again
    CACHE_WRITE = "dus"  # model/layers.write_cache: what LiteRT-LM's executors run
    FP32_GATHER = True  # an fp32 drafter gathers its candidate rows, its table staying float (model/drafter.py)

    @classmethod
    @contextmanager
    def open(cls, out: Path, contract: Contract, on_stage: Callable[[str], None]) -> Iterator[LitertFormat]:
        """The format for one export, working in a scratch folder next to `out`."""
        with tempfile.TemporaryDirectory(prefix=".edge-mtp-", dir=out.parent) as tmp:
            yield cls(contract, Path(tmp), on_stage)

    # -- one piece ------------------------------------------------------------------------------------------------

    def convert(self, name: str, module: torch.nn.Module, samples: PieceSamples, weights: dict[str, np.ndarray],
                layer: int | None) -> Path:
        """The piece's fp32 .tflite: converted, or a layer kind's template refilled with this layer's weights."""
        few_rows = ".small" if name in (EMBEDDER, PER_LAYER_EMBEDDER) else ""  # the widened model takes <name>.tflite
        path = self.work / f"{name}{few_rows}.tflite"
        modules = {sig: module for sig in samples.by_signature}
        if layer is None:
            return convert_module(modules, samples.by_signature, path)
        kind = layer_kind(self.contract.target, layer)
        if kind not in self.templates:
            self.templates[kind] = self._template(layer, module, samples, self.work / f"kind{len(self.templates)}.tflite")
        template = self.templates[kind]
        if template.slots is None:
            return convert_module(modules, samples.by_signature, path)
        return refill_weights(template.path, template.slots, {n: t.numpy() for n, t in module.state_dict().items()},
                              path)

    def _template(self, i: int, piece: LayerPiece, samples: PieceSamples, path: Path) -> Template:
        """A layer kind converted once with distinct placeholder weights (or taken from the template cache), and
        where each weight's buffer is."""
        real = {n: t.clone() for n, t in piece.state_dict().items()}
        placeholders = {n: _placeholder(t.shape, k) for k, (n, t) in enumerate(real.items())}
        wanted = {n: v.numpy() for n, v in placeholders.items()}
        key = template_cache.template_key(self.contract.target, self.contract, i, self.CACHE_WRITE, samples.by_signature)
        if template_cache.fetch(key, path):
            try:
                return Template(path, locate_weights(read_tflite(path), wanted))
            except EdgeMtpError:  # a damaged or foreign file: convert afresh
                pass
        for n, value in placeholders.items():
            assign(piece, n, value)
        try:
            convert_module({sig: piece for sig in samples.by_signature}, samples.by_signature, path)
        finally:
            for n, value in real.items():
                assign(piece, n, value)
        try:
            slots = locate_weights(read_tflite(path), wanted)
        except EdgeMtpError:
            return Template(path, None)  # the converter folded a weight: convert every layer of this kind instead
        template_cache.store(key, path)
        return Template(path, slots)

    def quantize(self, name: str, fp32: Path, recipe: str) -> Path:
        """The piece under a uniform recipe (fp32: the piece itself)."""
        if recipe == "fp32":
            return fp32
        return quantize_file(fp32, component_recipe(recipe), fp32.with_suffix(f".{recipe}.tflite"))

    def runner(self, path: Path) -> TfliteRunner:
        """Runs a piece's signatures."""
        return TfliteRunner(path)

    def name(self, path: Path, weights: dict[str, np.ndarray], recipe: str) -> None:
        """Give each weight's tensor in the quantized piece the weight's checkpoint name (export.stored.name_weights):
        validate checks the checkpoint's values there, so a weight read under the wrong name cannot pass. Tables
        are found by their shape instead (checks/weights.py)."""
        if weights:
            name_weights(path, weights, recipe, converter_folds(self.contract.target.hidden_size))

    def size(self, path: Path) -> int:
        """Bytes of a piece."""
        return path.stat().st_size

    def remove(self, *paths: Path) -> None:
        """Delete pieces no longer needed."""
        for path in paths:
            if path.exists():
                path.unlink()

    # -- joined models --------------------------------------------------------------------------------------------

    def model(self, name: str) -> GraphJoiner:
        """An empty joined model with the bundle model's signatures, its weights streaming into a data file."""
        if name == TARGET:
            joiner = GraphJoiner(self.contract.target_signatures(), self.work / "target.data")
            joiner.alias(HIDDEN, "embeddings")
            return joiner
        signature = self.contract.embedder() if name == EMBEDDER else self.contract.per_layer_embedder()
        return GraphJoiner([signature], self.work / f"{name}.data")

    def join(self, model: GraphJoiner, name: str, piece: Path, rename: dict[str, str] | None = None) -> None:
        """Append a checked piece to the joined model, and delete it."""
        model.add(piece, name, rename)
        self.remove(piece)

    def widen(self, model: GraphJoiner, table: Table, report: PieceReport) -> None:
        """Append a table piece with its table widened to the whole vocabulary, quantized in row chunks the way the
        piece was."""
        spec, piece = self.contract.target, read_tflite(table.piece)
        small, width = table.rows.shape
        factor = folded_factor(read_tflite(table.fp32), small, width, table.rows) if table.name == HEAD else 1.0
        slot = find_table(piece, small, width)
        check_format(piece, slot, table.rows * factor)
        tied = self.embedding
        if table.name == HEAD and tied is not None and tied.format == slot.format and (tied.scales is not None
                                                                                        or factor == 1):
            values = tied.scaled(factor)  # the embedder's very bytes: the bundle stores them once (bundle.litertlm)
        else:
            self.on_stage(f"quantizing the {'LM head' if table.name == HEAD else table.name.replace('_', ' ')} table")
            values = QuantizedTable(slot.format, lambda a, b: table.read_rows(a, b) * factor, table.vocab, width,
                                    self.work / f"{table.name}.table")
        replace = widen(piece, slot, small, table.vocab, values)
        if table.name != HEAD:
            self.widened[table.name] = table, values, report
            model.add(table.piece, table.name, replace=replace, model=piece)
            return
        for kind in self.templates.values():
            self.remove(kind.path)
        replace[slot.buffer] = model.append_buffer(replace[slot.buffer], lead=True)
        model.add(table.piece, table.name, replace=replace, model=piece)
        report.bytes, report.fp32_bytes = values.bytes, 4 * spec.vocab_size * spec.hidden_size
        self.remove(table.piece, table.fp32, values.path, *([tied.path] if tied is not None else []))

    def finish(self, model: GraphJoiner | Path, name: str) -> Path:
        """Write a joined model (a drafter is its piece already); a widened embedder must give back its rows."""
        if name == DRAFTER:
            return model
        if name == TARGET:
            self.on_stage("writing the target model")
        path = model.finish(self.work / f"{name}.tflite")
        if name in self.widened:
            table, values, report = self.widened.pop(name)
            self._check_table(path, table, values)
            report.bytes, report.fp32_bytes = path.stat().st_size, 4 * values.rows * table.rows.shape[1]
            self.remove(table.piece, table.fp32)
            if name == EMBEDDER:
                self.embedding = values
            else:
                self.remove(values.path)
        return path

    def _check_table(self, path: Path, table: Table, values: QuantizedTable) -> None:
        """The widened model must return exactly the dequantized rows (times its scale) for ids across the table."""
        wrapped: SignatureModule = table.module
        local = "embed_tokens.weight" if table.name == EMBEDDER else "embed_tokens_per_layer.weight"
        ids = np.unique(np.r_[0, 1, values.rows // 2, values.rows - 1,
                              np.random.default_rng(3).integers(0, values.rows, 4)])
        runner = TfliteRunner(path)
        with swapped(wrapped.model, local, torch.from_numpy(values.rows_back(ids))):
            for k, token in enumerate(ids):
                got = runner(wrapped.signature_name, {"token_ids": np.array([[token]], np.int32)})
                want = run_reference(wrapped, {"token_ids": np.array([[k]], np.int32)})
                for key, value in want.items():
                    err = float(np.abs(got[key].reshape(value.shape) - value).max())
                    if err > TOLERANCE * max(float(np.abs(value).max()), 1e-6):
                        raise EdgeMtpError(f"internal: the widened {table.name} returns wrong rows for token {token} "
                                           f"(error {err:.3g}); please report it with the checkpoint's config.json.")

    # -- the bundle -----------------------------------------------------------------------------------------------

    def write(self, out: Path, paths: dict[str, Path], reports: dict[str, PieceReport], source: TargetSource,
              drafter: Drafter | None, tokenizer: Path, meta: BundleMetadata, quant: str,
              source_assistant: str | Path | None, allow_template_mismatch: bool) -> dict:
        """Check a candidate bundle end to end, then write the .litertlm at `out` atomically; its quantization report."""
        contract, work = self.contract, self.work
        manifest = {
            "format": "edge-mtp-litertlm", "format_version": MANIFEST_VERSION, "draft_len": contract.draft_len,
            "param_tensor": contract.param_tensor, "sliding_ring": contract.sliding_ring, **contract.kv_record(),
            "context": contract.context, "prefill_lengths": list(contract.prefill_lengths),
            "kv_layout": "K[1,Hkv,C,hd] V[1,Hkv,hd,C]", "target": spec_to_dict(source.spec),
            "drafter": spec_to_dict(drafter.spec) if drafter else None, "quantization": quant,
            "source": {"target": str(source.origin), "assistant": str(source_assistant) if source_assistant else None,
                       "sha256": {"target": source_files(source.origin), "assistant":
                                  source_files(resolve_checkpoint(source_assistant)) if source_assistant else None}},
        }
        self.on_stage("writing the candidate bundle")
        candidate = work / "candidate.litertlm"
        write_litertlm(candidate, paths, contract, tokenizer, meta, manifest, work)
        report = litert_bundle_report(candidate, source, drafter, contract,
                                      Tokenizer(tokenizer.read_text(), meta.start_token, meta.stop_tokens),
                                      self.on_stage)
        enforce(report, str(out), exact=quant == "fp32" and contract.kv_dtype == "float32")
        report["components"] = {name: {k: v for k, v in asdict(r).items() if k != "seconds"}  # reproducible
                                for name, r in reports.items()}
        manifest["quantization_report"] = report
        fit = fit_template(meta.chat_template, checkpoint_specials(source.directory) if meta.chat_template else {},
                           candidate, contract.context, allow_template_mismatch)
        meta.chat_template, manifest["chat_template"] = fit.template, fit.to_dict()
        candidate.unlink()
        self.on_stage("writing bundle")
        with atomic_file(out) as partial:
            write_litertlm(partial, paths, contract, tokenizer, meta, manifest, work)
            read_litertlm(partial)
        return report

    @staticmethod
    def publish(out: Path, contract: Contract) -> tuple[int, list[dict]]:
        """Write the bundle's AI Edge Gallery entry next to it; (bundle bytes, its sections)."""
        (out.parent / f"{out.stem}.allowlist.json").write_text(
            json.dumps({"models": [gallery_entry(out, out.stem, contract)]}, indent=2))
        bundle = read_litertlm(out)
        return out.stat().st_size, [{"type": s.data_type, "model_type": s.model_type, "bytes": s.end - s.begin}
                                    for s in bundle.sections]


def gallery_entry(bundle: Path, name: str, contract: Contract) -> dict:
    """An AI Edge Gallery model_allowlist.json entry for the bundle, with the fields of Google's Gemma 4 entries.

    The GPU is offered only where the bundle drafts there too (an in-place cache, export --gpu) or has no drafter:
    Gallery users switch accelerators with MTP on, and LiteRT-LM 0.18.1's GPU executor cannot draft otherwise."""
    drafts = contract.drafter is not None
    gpu = not drafts or contract.param_tensor
    return {
        "name": name,
        "modelId": f"local/{bundle.stem}",
        "modelFile": bundle.name,
        "description": f"Gemma 4 with MTP drafter (draft length {contract.draft_len}), exported by edge-mtp."
        if drafts else "Gemma 4, exported by edge-mtp.",
        "sizeInBytes": bundle.stat().st_size,
        "version": "1",
        "llmSupportImage": False,
        "llmSupportAudio": False,
        "maxContextLength": contract.context,
        "capabilities": ["speculative_decoding"] if drafts else [],
        "defaultConfig": {**GALLERY_SAMPLING, "maxTokens": min(GALLERY_MAX_TOKENS, contract.context),
                          "accelerators": "cpu,gpu" if gpu else "cpu"},
        "taskTypes": ["llm_chat", "llm_prompt_lab"],
    }


def _placeholder(shape: torch.Size, k: int) -> torch.Tensor:
    """Distinct random values per tensor, so each weight's buffer can be found by content."""
    g = torch.Generator().manual_seed(1000 + k)
    if len(shape) >= 2:
        return torch.randn(shape, generator=g) * 0.02
    return 1.0 + 0.1 * torch.randn(shape, generator=g)
