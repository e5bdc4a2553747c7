"""The streamed export driver: one path for every model size and both formats.

Peak memory is bounded by a piece, never by the model. The target is cut into pieces (export.pieces): a prelude,
one piece per decoder layer and the LM head. For each piece the driver loads only its weights from the checkpoint
(fp32), has the format convert it, checks every signature against the PyTorch piece, quantizes it under the recipe
rules below, and has the format append it to the joined model, whose weights stream into a data file. Vocabulary-
sized tables (embedder, per-layer embedder, LM head) are converted on a few rows and widened to the whole vocabulary
by the format, in row chunks. The drafter (78 M parameters) converts whole.

A format is an adapter (export/litert_format.py, export/onnx_format.py) that does the work on one piece: `convert`
(fp32, its weights named), `runner` (to check it against PyTorch and its quantized versions against it), `quantize`
(one uniform recipe), `name`, `size`, `remove`; and on a joined model: `model` (a new one), `join` (a piece), `widen` (a table piece
to the whole vocabulary), `finish`. The driver decides what is made, in which order, and with which recipe.
"""

from __future__ import annotations

import errno
import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..checkpoint.reading import swapped
from ..model.contract import DRAFTER, EMBEDDER, PER_LAYER_EMBEDDER, TARGET, Contract
from ..model.drafter import Drafter
from ..model.kv_quant import rounded_as
from ..model.loading import TargetSource
from ..util.errors import EdgeMtpError
from .pieces import HEAD, Head, LayerPiece, PieceInputs, PieceSamples, Prelude, layer_rename, small_vocab
from .signatures import (SignatureModule, compare_outputs, relative_error, run_reference, sample_inputs,
                         written_rows)

TOLERANCE = 1e-4  # max abs error / reference magnitude, per output of every converted signature
SEEDS = (0, 100, 101)  # seed 0 traces; every seed checks
# Relative output error (max |error| / max |output|, random inputs) above which 'mixed' keeps a component at 8 bits.
# A 4-bit symmetric grid's half-step is 1/14 ~ 0.071 of a block's largest weight, so a bare table lookup already
# shows ~0.06-0.07 (measured on the demo pair: embedder 0.060 / 0.071, per-layer embedder 0.062 / 0.068 in ONNX /
# LiteRT); at 0.05 every component counted as sensitive and 'mixed' was int8 everywhere. 0.1 flags a component
# only when 4 bits cost clearly more than the grid itself (the demo target in LiteRT: 0.197 -> int8).
MIXED_SENSITIVITY = 0.1
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
class Table:
    """A vocabulary table's piece, converted on its first `small` rows: what the format widens to `vocab` rows."""

    name: str
    fp32: Path
    piece: Path
    rows: np.ndarray
    read_rows: Callable[[int, int], np.ndarray]  # (start, stop) -> fp32 rows of the checkpoint
    vocab: int
    module: SignatureModule | Head


def mixed_choice(name: str, int4_error: Callable[[], float] | None) -> tuple[str, float | None]:
    """The recipe 'mixed' gives one component, and the measured 4-bit error it was decided on (None: not measured).

    The drafter stays at 8 bits (a quantized drafter loses acceptance first); any other component gets 4 bits
    unless `int4_error()` (relative error of its 4-bit version on random inputs) exceeds MIXED_SENSITIVITY.
    """
    if name == DRAFTER:
        return "int8", None
    error = int4_error() if int4_error else 0.0
    return ("int4" if error <= MIXED_SENSITIVITY else "int8"), error


def signature_names(contract: Contract) -> dict[str, list]:
    """The signatures of each bundle model."""
    out = {EMBEDDER: [contract.embedder()], TARGET: list(contract.target_signatures())}
    if contract.target.ple_dim:
        out[PER_LAYER_EMBEDDER] = [contract.per_layer_embedder()]
    if contract.drafter is not None:
        out[DRAFTER] = [contract.drafter_signature()]
    return out


def check_piece(run: Callable[[str, dict], dict], module: torch.nn.Module, samples: PieceSamples,
                first: int = 1) -> dict[str, dict]:
    """Compare a converted piece (`run(signature, inputs)`) with its PyTorch module on every signature's samples
    from the `first` on; the worst error per output."""
    report: dict[str, dict] = {}
    for signature, rows in samples.by_signature.items():
        worst: dict[str, dict[str, float]] = {}
        for row in rows[first:]:
            got = run(signature, row)
            with rounded_as(written_rows(got, row)):  # int8 caches: see kv_quant.rounded_as
                want = run_reference(module, row)
            for output, r in compare_outputs(got, want).items():
                if output not in worst or r["relative"] > worst[output]["relative"]:
                    worst[output] = r
        report[signature] = worst
    return report


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
class StreamedExport:
    """Builds the bundle's models from a target source, piece by piece, through a format adapter (see module doc)."""

    source: TargetSource
    drafter: Drafter | None
    contract: Contract
    fmt: Any  # the format adapter (see module doc)
    quant: str
    check: bool = True  # compare every piece with PyTorch (off only where a caller checks the whole model itself)
    on_stage: Callable[[str], None] = lambda s: None
    on_progress: Progress = lambda what, done, total: None
    reports: dict[str, PieceReport] = field(default_factory=dict)
    _done: int = 0

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

    # -- one piece: convert, check, quantize ----------------------------------------------------------------------

    def _piece(self, name: str, module: torch.nn.Module, samples: PieceSamples, weights: dict[str, torch.Tensor],
               table: str | None = None, layer: int | None = None) -> tuple[Path, Path]:
        """Convert a piece, check it against PyTorch, quantize it; (its fp32 file, the file to use). Its checkpoint
        `weights` are named in it (validate finds each weight there); `table`: the one widened afterwards."""
        start = time.time()
        values = {n: t.detach().float().numpy() for n, t in weights.items() if t.is_floating_point()}
        fp32 = self.fmt.convert(name, module, samples, values, layer)
        worst = enforce_tolerance(name, check_piece(self.fmt.runner(fp32), module, samples,
                                                    self.fmt.FIRST_CHECKED)) if self.check else 0.0
        made: dict[str, tuple[Path, float | None]] = {}

        def quantized(recipe: str) -> tuple[Path, float | None]:
            if recipe not in made:
                path = self.fmt.quantize(name, fp32, recipe)
                made[recipe] = path, None if recipe == "fp32" else self._error(fp32, path, samples)
            return made[recipe]

        recipe, int4_error = self.quant, None
        if recipe == "mixed":
            recipe, int4_error = mixed_choice(name, lambda: quantized("int4")[1])
        path, error = quantized(recipe)
        self.fmt.remove(*(p for r, (p, _) in made.items() if r != recipe))
        self.reports[name] = PieceReport(recipe, worst, error, self.fmt.size(path), self.fmt.size(fp32),
                                         time.time() - start, int4_error)
        self.fmt.name(path, {n: v for n, v in values.items() if n != table}, recipe)
        if table is None and path != fp32:
            self.fmt.remove(fp32)
        gc.collect()
        return fp32, path

    def _error(self, fp32: Path, quantized: Path, samples: PieceSamples) -> float:
        """Relative error of a quantized piece's first non-cache output against its fp32 version (checking seeds)."""
        reference, candidate = self.fmt.runner(fp32), self.fmt.runner(quantized)
        worst = 0.0
        for signature, rows in samples.by_signature.items():
            for row in rows[1:]:
                want, got = reference(signature, row), candidate(signature, row)
                worst = max(worst, relative_error(got, want, next(k for k in want if "cache" not in k)))
        return worst

    def _table(self, name: str, module: SignatureModule | Head, holder: torch.nn.Module, local: str, owner: str,
               samples: PieceSamples, weights: dict[str, torch.Tensor]) -> Table:
        """A table's piece on a few rows of the checkpoint's table `local` (its other checkpoint `weights`)."""
        src = self.source
        entry = src.entry(local, owner)
        vocab, width = entry.shape
        rows = src.rows(entry, 0, small_vocab(self._dimensions(), vocab))
        with swapped(holder, local, rows):
            fp32, piece = self._piece(name, module, samples, weights | {local: rows}, table=local)
        return Table(name, fp32, piece, rows.numpy(), lambda a, b: src.rows(entry, a, b).numpy(), vocab, module)

    def _dimensions(self) -> set[int]:
        """Every size of the model a table's few rows must not share (so widening finds exactly the vocabulary axes)."""
        c, s = self.contract, self.contract.target
        return {c.context, c.verify_len, *c.prefill_lengths, s.hidden_size, s.num_layers, s.ple_dim,
                s.num_layers * s.ple_dim, s.head_dim, s.global_head_dim, s.intermediate_size * 2, s.intermediate_size,
                s.num_kv_heads, s.num_heads, *{s.layer_intermediate_size(i) for i in range(s.num_layers)}}

    # -- the target -----------------------------------------------------------------------------------------------

    def target_model(self) -> Path:
        """prelude + layers + head, joined into one model serving every target signature."""
        spec, src, fmt = self.contract.target, self.source, self.fmt
        model = fmt.model(TARGET)
        self.on_stage(f"{fmt.VERB} the target layer by layer")
        parts = ("per_layer_model_projection", "per_layer_projection_norm") if spec.ple_dim else ()
        for part in parts:
            src.load(TARGET, part)
        prelude = Prelude(src.models.target)
        inputs = PieceInputs(self.contract, prelude, SEEDS)
        _, piece = self._piece("prelude", prelude, inputs.prelude(),
                               dict(prelude.named_parameters()) | dict(prelude.named_buffers()))
        fmt.join(model, "prelude", piece)
        for part in parts:
            src.release(TARGET, part)
        self._step("prelude")
        available = inputs.available()
        for i in range(spec.num_layers):
            src.load(TARGET, f"layers.{i}.")
            layer = LayerPiece(src.models.target, i, available)
            _, piece = self._piece(f"layer_{i}", layer, inputs.layer(layer),
                                   {f"layers.{i}.{n.removeprefix('layer.')}": t for n, t in layer.state_dict().items()},
                                   layer=i)
            fmt.join(model, f"layer_{i}", piece, layer_rename(src.models.target, i, layer))
            src.release(TARGET, f"layers.{i}.")
            self._step(f"layer {i + 1}/{spec.num_layers}")
        src.load(TARGET, "norm")
        target = src.models.target
        table = self._table(HEAD, Head(target), target, "embed_tokens.weight", TARGET, inputs.head(),
                            {"norm.weight": target.norm.weight})
        src.release(TARGET, "norm")
        fmt.widen(model, table, self.reports[HEAD])
        self._step(HEAD)
        return fmt.finish(model, TARGET)

    # -- embedders and drafter ------------------------------------------------------------------------------------

    def embedder(self, name: str) -> Path:
        """The (per-layer) embedder: converted on a few rows, its table quantized in chunks and widened."""
        signature = self.contract.embedder() if name == EMBEDDER else self.contract.per_layer_embedder()
        holder = self.source.modules[name]
        local = "embed_tokens.weight" if name == EMBEDDER else "embed_tokens_per_layer.weight"
        ids = small_vocab(self._dimensions(), self.contract.target.vocab_size)  # within the few rows
        rng = np.random.default_rng(5)
        samples = PieceSamples({signature.name: [{"token_ids": rng.integers(0, ids, (1, 1)).astype(np.int32)}
                                                 for _ in SEEDS]})
        self.on_stage(f"{self.fmt.VERB} the {name.replace('_', ' ')}")
        model = self.fmt.model(name)
        table = self._table(name, SignatureModule(holder, signature), holder, local, name, samples, {})
        self.fmt.widen(model, table, self.reports[name])
        path = self.fmt.finish(model, name)
        self._step(name.replace("_", " "))
        return path

    def drafter_model(self) -> Path:
        """The MTP drafter, converted whole (78 M parameters), checked and quantized."""
        self.on_stage(f"{self.fmt.VERB} the MTP drafter")
        sig = self.contract.drafter_signature()
        module = SignatureModule(self.drafter, sig, ("activations", "input_pos", "mask"))
        samples = PieceSamples({sig.name: [sample_inputs(sig, self.contract, seed=s) for s in SEEDS]})
        _, path = self._piece(DRAFTER, module, samples, dict(self.drafter.named_parameters()))
        path = self.fmt.finish(path, DRAFTER)
        self._step("drafter")
        return path
