"""The streamed export driver: one path for every model size.

Peak memory is bounded by a piece, never by the model. The target is cut into pieces (export.pieces): a prelude,
one piece per decoder layer and the LM head. For each piece the driver loads only its weights from the checkpoint
(fp32), converts it (layers of one kind are converted once, with placeholder weights, and every layer of the kind
is that graph refilled with its own weights), checks each signature against the PyTorch piece, quantizes the piece,
and appends it to the joined model, whose weights stream into a data file. Vocabulary-sized tables (embedder,
per-layer embedder, LM head) are converted with a few rows, quantized here in row chunks and widened
(export.tables). The drafter (78 M parameters) converts whole.
"""

from __future__ import annotations

import errno
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..checkpoint.reading import assign, swapped
from ..formats.tflite import read_tflite
from ..model.contract import DRAFTER, EMBEDDER, PER_LAYER_EMBEDDER, TARGET, Contract
from ..model.drafter import Drafter
from ..model.loading import TargetCheckpoint
from ..util.errors import EdgeMtpError
from . import template_cache
from .joiner import GraphJoiner, WeightSlot, locate_weights, refill_weights
from .litert import TfliteRunner, check_module, convert_module
from .pieces import HIDDEN, Head, LayerPiece, PieceInputs, PieceSamples, Prelude, layer_kind, layer_rename
from .quantize import MIXED_SENSITIVITY, component_recipe, quantize_file
from .signatures import ExportUnit, SignatureModule, run_reference
from .stored import converter_folds, name_weights
from .tables import QuantizedTable, check_format, find_table, folded_factor, small_vocab, widen

TOLERANCE = 1e-4  # max abs error / reference magnitude, per output of every converted signature
Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass
class PieceReport:
    """What one piece cost and how close it stayed: worst fp32 error vs PyTorch, and its quantization error."""

    recipe: str
    fp32_error: float
    quantization_error: float | None
    bytes: int
    fp32_bytes: int
    seconds: float
    int4_error: float | None = None  # what 'mixed' decided on


@dataclass
class Template:
    """A layer kind's conversion with placeholder weights, and where each weight sits in it (None: convert each)."""

    path: Path
    slots: dict[str, WeightSlot] | None


class PieceOrder:
    """The order of a bundle's pieces and the progress count over them, shared by the LiteRT and ONNX exporters.

    A subclass has `contract`, `drafter`, `on_progress`, a `_done` counter and builds each model with `embedder`,
    `target_model` and `drafter_model`, each calling `_step` once per finished piece.
    """

    def total_steps(self) -> int:
        """Pieces to make: embedder(s), prelude, layers, head, drafter."""
        s = self.contract.target
        return s.num_layers + 3 + bool(s.ple_dim) + (self.drafter is not None)

    def _step(self, what: str) -> None:
        self._done += 1
        self.on_progress(what, self._done, self.total_steps())

    def run(self) -> dict[str, Path]:
        """Every model of the bundle, quantized, in bundle order."""
        self.on_progress("starting", 0, self.total_steps())
        paths = {EMBEDDER: self.embedder(EMBEDDER)}
        if self.contract.target.ple_dim:
            paths[PER_LAYER_EMBEDDER] = self.embedder(PER_LAYER_EMBEDDER)
        paths[TARGET] = self.target_model()
        if self.drafter is not None:
            paths[DRAFTER] = self.drafter_model()
        return paths


@contextmanager
def export_resource_errors(out: Path) -> Iterator[None]:
    """A full disk or exhausted memory during an export, as one sentence saying what to do."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise EdgeMtpError(f"The disk holding {out.parent} is full; free space (a real-size export needs "
                               "about three times the bundle's size while it works) and export again.") from None
        raise
    except MemoryError:
        raise EdgeMtpError("The export ran out of memory; close other programs or export with a smaller "
                           "--prefill/--context.") from None


@dataclass
class StreamedExport(PieceOrder):
    """Builds the bundle's .tflite models from a checkpoint opened for streaming (see module doc)."""

    checkpoint: TargetCheckpoint
    drafter: Drafter | None
    contract: Contract
    work: Path
    quant: str
    on_stage: Callable[[str], None] = lambda s: None
    on_progress: Progress = lambda what, done, total: None
    reports: dict[str, PieceReport] = field(default_factory=dict)
    templates: dict[tuple, Template] = field(default_factory=dict)
    embedding: QuantizedTable | None = None  # the embedder's table, kept for the tied LM head
    _done: int = 0

    @property
    def target(self):
        return self.checkpoint.models.target


    # ---------------------------------------------------------------------------------------------------------
    # One piece: convert (or refill a template), check, quantize

    def _recipe(self, name: str, fp32: Path, modules: dict,
                samples: PieceSamples) -> tuple[str, Path, float | None, float | None]:
        """Quantize a checked fp32 piece: (recipe it got, path, its quantization error, the int4 error 'mixed' saw)."""
        if self.quant == "fp32":
            return "fp32", fp32, None, None
        recipe = self.quant
        if recipe == "mixed":
            recipe = "int8" if name == "drafter" else "int4"
        out = quantize_file(fp32, component_recipe(recipe), fp32.with_suffix(f".{recipe}.tflite"))
        error = _output_error(fp32, out, modules, samples)
        int4_error = error if self.quant == "mixed" and recipe == "int4" else None
        if int4_error is not None and int4_error > MIXED_SENSITIVITY:
            out.unlink()
            recipe = "int8"
            out = quantize_file(fp32, component_recipe(recipe), fp32.with_suffix(f".{recipe}.tflite"))
            error = _output_error(fp32, out, modules, samples)
        return recipe, out, error, int4_error

    def _piece(self, name: str, modules: dict, samples: PieceSamples, fp32: Path,
               convert: Callable[[], Path] | None = None) -> Path:
        """Convert (or build with `convert`), check against PyTorch, quantize; returns the quantized piece."""
        start = time.time()
        fp32 = convert() if convert is not None else convert_module(modules, samples.by_signature, fp32)
        worst = enforce_tolerance(name, check_module(fp32, modules, samples.by_signature))
        recipe, path, error, int4_error = self._recipe(name, fp32, modules, samples)
        self.reports[name] = PieceReport(recipe, worst, error, path.stat().st_size, fp32.stat().st_size,
                                         time.time() - start, int4_error)
        return path

    def _name(self, piece: str, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        """Give each weight's tensor in the quantized piece the weight's checkpoint name (export.stored.name_weights):
        validate checks the checkpoint's values there, so a weight read under the wrong name cannot pass."""
        values = {n: t.detach().float().numpy() for n, t in tensors.items() if t.is_floating_point()}
        name_weights(path, values, self.reports[piece].recipe, converter_folds(self.contract.target.hidden_size))

    # ---------------------------------------------------------------------------------------------------------
    # The target

    def target_model(self) -> Path:
        """prelude + layers + head, joined into one model with every target signature."""
        spec, ck = self.contract.target, self.checkpoint
        joiner = GraphJoiner(self.contract.target_signatures(), self.work / "target.data")
        joiner.alias(HIDDEN, "embeddings")
        self.on_stage("converting the target layer by layer")
        ck.load(TARGET, "per_layer_model_projection")
        ck.load(TARGET, "per_layer_projection_norm")
        prelude = Prelude(self.target)
        inputs = PieceInputs(self.contract, prelude)
        samples = inputs.prelude()
        modules = {sig: prelude for sig in samples.by_signature}
        path = self._piece("prelude", modules, samples, self.work / "prelude.tflite")
        self._name("prelude", path, {**dict(prelude.named_parameters()), **dict(prelude.named_buffers())})
        joiner.add(path, "prelude")
        ck.release(TARGET, "per_layer_model_projection")
        ck.release(TARGET, "per_layer_projection_norm")
        self._step("prelude")
        available = inputs.available()
        for i in range(spec.num_layers):
            ck.load(TARGET, f"layers.{i}.")
            piece = LayerPiece(self.target, i, available)
            samples = inputs.layer(piece)
            modules = {sig: piece for sig in samples.by_signature}
            kind = layer_kind(spec, i)
            if kind not in self.templates:
                self.templates[kind] = self._template(i, piece, samples, self.work / f"kind{len(self.templates)}.tflite")
            template = self.templates[kind]
            fp32 = self.work / f"layer_{i}.tflite"
            refill = None
            if template.slots is not None:
                weights = {n: t.numpy() for n, t in piece.state_dict().items()}
                refill = lambda: refill_weights(template.path, template.slots, weights, fp32)  # noqa: E731
            path = self._piece(f"layer_{i}", modules, samples, fp32, refill)
            self._name(f"layer_{i}", path, {f"layers.{i}.{n.removeprefix('layer.')}": t
                                            for n, t in piece.state_dict().items()})
            joiner.add(path, f"layer_{i}", layer_rename(self.target, i, piece))
            _remove(fp32, path)
            ck.release(TARGET, f"layers.{i}.")
            self._step(f"layer {i + 1}/{spec.num_layers}")
        for template in self.templates.values():
            _remove(template.path)
        self._head(joiner, inputs)
        self.on_stage("writing the target model")
        return joiner.finish(self.work / "target.tflite")

    def _template(self, i: int, piece: LayerPiece, samples: PieceSamples, path: Path) -> Template:
        """A layer kind converted once with distinct placeholder weights (or taken from the template cache), and
        where each weight's buffer is."""
        real = {n: t.clone() for n, t in piece.state_dict().items()}
        placeholders = {n: _placeholder(n, t.shape, k) for k, (n, t) in enumerate(real.items())}
        wanted = {n: v.numpy() for n, v in placeholders.items()}
        key = template_cache.template_key(self.contract.target, self.contract, i, self.target.cache_write,
                                          samples.by_signature)
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

    def _head(self, joiner: GraphJoiner, inputs: PieceInputs) -> None:
        """The LM head, converted on a few rows of the tied embedding and widened to the whole vocabulary."""
        spec, ck = self.contract.target, self.checkpoint
        ck.load(TARGET, "norm")
        entry = ck.entry("embed_tokens.weight")
        small = small_vocab(self._dimensions(), spec.vocab_size)
        rows = ck.rows(entry, 0, small)
        head = Head(self.target)
        samples = inputs.head()
        with swapped(self.target, "embed_tokens.weight", rows):
            path = self._piece("head", {sig: head for sig in samples.by_signature}, samples, self.work / "head.tflite")
        self._name("head", path, {"norm.weight": self.target.norm.weight})
        ck.release(TARGET, "norm")
        factor = folded_factor(read_tflite(self.work / "head.tflite"), small, spec.hidden_size, rows.numpy())
        model = read_tflite(path)
        slot = find_table(model, small, spec.hidden_size)
        check_format(model, slot, rows.numpy() * factor)
        tied = self.embedding
        if tied is not None and tied.format == slot.format and (tied.scales is not None or factor == 1):
            table = tied.scaled(factor)  # the embedder's very bytes: the bundle stores them once (bundle.litertlm)
        else:
            self.on_stage("quantizing the LM head table")
            table = QuantizedTable(slot.format, lambda a, b: ck.rows(entry, a, b).numpy() * factor, spec.vocab_size,
                                   spec.hidden_size, self.work / "head.table")
        replace = widen(model, slot, small, spec.vocab_size, table)
        replace[slot.buffer] = joiner.append_buffer(replace[slot.buffer], lead=True)
        joiner.add(path, "head", replace=replace, model=model)
        self.reports["head"].bytes, self.reports["head"].fp32_bytes = table.bytes, 4 * spec.vocab_size * spec.hidden_size
        _remove(path, self.work / "head.tflite", table.path, *([tied.path] if tied is not None else []))
        self._step("head")

    def _dimensions(self) -> set[int]:
        c, s = self.contract, self.contract.target
        return {c.context, c.verify_len, *c.prefill_lengths, s.hidden_size, s.num_layers, s.ple_dim,
                s.num_layers * s.ple_dim, s.head_dim, s.global_head_dim, s.intermediate_size * 2, s.intermediate_size}

    # ---------------------------------------------------------------------------------------------------------
    # Embedders and drafter

    def embedder(self, name: str) -> Path:
        """The (per-layer) embedder: converted on a few rows, its table quantized in chunks and widened."""
        ck = self.checkpoint
        module = ck.modules[name]
        local = "embed_tokens.weight" if name == EMBEDDER else "embed_tokens_per_layer.weight"
        entry = ck.entry(local, name)
        vocab, width = entry.shape
        small = small_vocab(self._dimensions(), vocab)
        rows = ck.rows(entry, 0, small)
        signature = self.contract.embedder() if name == EMBEDDER else self.contract.per_layer_embedder()
        wrapped = SignatureModule(module, signature)
        rng = np.random.default_rng(5)
        samples = PieceSamples({signature.name: [{"token_ids": rng.integers(0, small, (1, 1)).astype(np.int32)}
                                                 for _ in range(3)]})
        self.on_stage(f"converting the {name.replace('_', ' ')}")
        with swapped(module, local, rows):
            path = self._piece(name, {signature.name: wrapped}, samples, self.work / f"{name}.small.tflite")
        model = read_tflite(path)
        slot = find_table(model, small, width)
        check_format(model, slot, rows.numpy())
        self.on_stage(f"quantizing the {name.replace('_', ' ')} table")
        table = QuantizedTable(slot.format, lambda a, b: ck.rows(entry, a, b).numpy(), vocab, width,
                               self.work / f"{name}.table")
        joiner = GraphJoiner([signature], self.work / f"{name}.data")
        joiner.add(path, name, replace=widen(model, slot, small, vocab, table), model=model)
        out = joiner.finish(self.work / f"{name}.tflite")
        self._check_table(name, out, wrapped, table)
        self.reports[name].bytes, self.reports[name].fp32_bytes = out.stat().st_size, 4 * vocab * width
        _remove(path, self.work / f"{name}.small.tflite")
        if name == EMBEDDER:
            self.embedding = table
        else:
            _remove(table.path)
        self._step(name.replace("_", " "))
        return out

    def _check_table(self, name: str, path: Path, wrapped: SignatureModule, table: QuantizedTable) -> None:
        """The widened model must return exactly the dequantized rows (times its scale) for ids across the table."""
        local = "embed_tokens.weight" if name == EMBEDDER else "embed_tokens_per_layer.weight"
        ids = np.unique(np.r_[0, 1, table.rows // 2, table.rows - 1,
                              np.random.default_rng(3).integers(0, table.rows, 4)])
        runner = TfliteRunner(path)
        with swapped(wrapped.model, local, torch.from_numpy(table.rows_back(ids))):
            for k, token in enumerate(ids):
                got = runner(wrapped.signature_name, {"token_ids": np.array([[token]], np.int32)})
                want = run_reference(wrapped, {"token_ids": np.array([[k]], np.int32)})
                for key, value in want.items():
                    err = float(np.abs(got[key].reshape(value.shape) - value).max())
                    if err > TOLERANCE * max(float(np.abs(value).max()), 1e-6):
                        raise EdgeMtpError(f"internal: the widened {name} returns wrong rows for token {token} "
                                           f"(error {err:.3g}); please report it with the checkpoint's config.json.")

    def drafter_model(self) -> Path:
        """The MTP drafter, converted whole (78 M parameters), checked and quantized."""
        self.on_stage("converting the MTP drafter")
        sig = self.contract.drafter_signature()
        module = SignatureModule(self.drafter, sig, ("activations", "input_pos", "mask"))
        from .litert import unit_samples

        samples = PieceSamples(unit_samples(ExportUnit("drafter", [(sig, module)]), self.contract))
        path = self._piece("drafter", {sig.name: module}, samples, self.work / "drafter.tflite")
        self._name("drafter", path, dict(self.drafter.named_parameters()))
        self._step("drafter")
        return path


def _placeholder(name: str, shape: torch.Size, k: int) -> torch.Tensor:
    """Distinct random values per tensor, so each weight's buffer can be found by content."""
    g = torch.Generator().manual_seed(1000 + k)
    if len(shape) >= 2:
        return torch.randn(shape, generator=g) * 0.02
    return 1.0 + 0.1 * torch.randn(shape, generator=g)


def _output_error(fp32: Path, quantized: Path, modules: dict, samples: PieceSamples) -> float:
    """Relative error of a quantized piece's first non-cache output against its fp32 version (checking seeds)."""
    worst = 0.0
    reference, candidate = TfliteRunner(fp32), TfliteRunner(quantized)
    for name in modules:
        for inputs in samples.by_signature[name][1:]:
            want, got = reference(name, inputs), candidate(name, inputs)
            key = next(k for k in want if "cache" not in k)
            scale = float(np.abs(want[key]).max()) or 1.0
            worst = max(worst, float(np.abs(got[key] - want[key]).max()) / scale)
    return worst


def enforce_tolerance(model: str, report: dict[str, dict]) -> float:
    """The worst relative error of a checked piece; a converter miscompile stops the export."""
    worst = 0.0
    for signature, outputs in report.items():
        for name, row in outputs.items():
            if row["relative"] > TOLERANCE:
                raise EdgeMtpError(
                    f"The converted {model} signature '{signature}' differs from PyTorch on '{name}' "
                    f"(max error {row['max_abs_error']:.3g} vs magnitude {row['scale']:.3g}); this is a converter "
                    "miscompile: please report it with the checkpoint's config.json.")
            worst = max(worst, row["relative"])
    return worst


def _remove(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            path.unlink()
