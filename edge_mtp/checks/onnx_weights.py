"""An ONNX bundle's weights against the checkpoint it is validated against, byte for byte.

The ONNX twin of checks/weights.py. Every checkpoint weight has an initializer named after it in the piece that
computes with it (export/onnx_stored.py); rounded by onnxruntime's own quantization code for the encoding stored
there, which the piece's recipe must allow, the checkpoint's values give exactly its bytes, scales and zero points.
Initializers are read one at a time from the external data, vocabulary tables a chunk of rows at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..export.onnx_data import stored_bytes, stored_slice
from ..export.onnx_stored import StoredWeight, encoding_recipe, recipe_encodings, stored_weight
from ..export.onnx_tables import HEAD, encoders, per_tensor_scalars
from ..model.contract import DRAFTER, EMBEDDER, PER_LAYER_EMBEDDER, TARGET
from ..model.drafter import Drafter
from ..model.loading import TargetCheckpoint
from .weights import TABLE_CHUNK_ROWS, WeightReport, target_weights


class Graph:
    """The initializers of one bundle graph (no external data loaded) and the folder their data lies in."""

    def __init__(self, path: Path):
        import onnx

        self.folder = path.parent
        self.initializers = {i.name: i for i in onnx.load(str(path), load_external_data=False).graph.initializer}


def _rows(value: np.ndarray) -> np.ndarray:
    return value.reshape(value.shape[0], -1) if value.ndim > 1 else value.reshape(1, -1)


def _candidates(stored: StoredWeight, recipe: str):
    """The encoders that may give the stored form from the checkpoint's rows, with their per-tensor arguments."""
    qtype = stored.initializers.get(stored.name + "_quantized")
    return encoders(encoding_recipe(stored.encoding, recipe), stored.name, stored.axis,
                    None if qtype is None else qtype.data_type)


def _bytes(array, init) -> bytes:
    """Our array's bytes in an initializer's stored type (4-bit codes come packed already)."""
    import onnx

    packed = init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    array = np.asarray(array)
    return array.tobytes() if packed else array.astype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).tobytes()


def _same(ours: dict[str, np.ndarray], stored: StoredWeight, theirs: dict[str, bytes]) -> bool:
    """Every stored initializer of the weight holds our bytes."""
    return set(ours) == set(theirs) and all(_bytes(ours[n], stored.initializers[n]) == theirs[n] for n in ours)


def _allowed(report: WeightReport, label: str, stored: StoredWeight | None, recipe: str, elements: int) -> bool:
    """Whether the weight is stored at all, in an encoding its piece's recipe gives (else a problem is noted)."""
    if stored is None:
        report.problems.append(f"{label} is not in the bundle (no tensor is named after it)")
        return False
    allowed = recipe_encodings(recipe, elements)
    if stored.encoding not in allowed:
        report.problems.append(f"{label} is stored as {stored.encoding} where the {recipe} recipe stores "
                               f"{' or '.join(allowed)}")
        return False
    return True


def check_weight(report: WeightReport, graph: Graph, name: str, label: str, value: np.ndarray, recipe: str) -> None:
    """One checkpoint weight against the initializers named after it."""
    value = np.asarray(value, np.float32)
    stored = stored_weight(graph.initializers, name)
    if not _allowed(report, label, stored, recipe, value.size):
        return
    theirs = {n: stored_bytes(i, graph.folder) for n, i in stored.initializers.items()}
    rows = _rows(value)
    codes = False
    for encode, per_tensor in _candidates(stored, recipe):
        if per_tensor:  # a lookup quantized whole: one scale from its range
            per_tensor["range"] = (np.float32(rows.min()), np.float32(rows.max()))
        ours = encode(rows) | (per_tensor_scalars(per_tensor, stored.name) if per_tensor else {})
        if _same(ours, stored, theirs):
            report.add(stored.encoding)
            return
        first = next(iter(ours))
        codes = codes or (first in theirs and _bytes(ours[first], stored.initializers[first]) == theirs[first])
    report.problems.append(f"{label} has its values in {stored.name} but other quantization scales" if codes else
                           f"{label} differs from the checkpoint's ({stored.encoding} rounding) in {stored.name}")


def check_table(report: WeightReport, graph: Graph, name: str, label: str, read_rows, vocab: int,
                recipe: str) -> None:
    """A vocabulary table against the checkpoint's rows, a chunk of rows at a time (int8 lookups: their range
    first, as the quantizer sets one scale for the whole table)."""
    stored = stored_weight(graph.initializers, name)
    if not _allowed(report, label, stored, recipe, vocab * read_rows(0, 1).shape[1]):
        return
    extent = None
    for encode, per_tensor in _candidates(stored, recipe):
        if per_tensor:
            if extent is None:
                lo, hi = np.inf, -np.inf
                for start in range(0, vocab, TABLE_CHUNK_ROWS):
                    rows = read_rows(start, min(vocab, start + TABLE_CHUNK_ROWS))
                    lo, hi = min(lo, float(rows.min())), max(hi, float(rows.max()))
                extent = (np.float32(lo), np.float32(hi))
            per_tensor["range"] = extent
            scalars = per_tensor_scalars(per_tensor, stored.name)
            theirs = {n: stored_bytes(stored.initializers[n], graph.folder) for n in scalars
                      if n in stored.initializers}
            if not _same(scalars, stored, theirs):
                continue
        if _same_table(graph, stored, encode, read_rows, vocab):
            report.add(f"{stored.encoding} table ({vocab} rows)")
            return
    report.problems.append(f"{label}: its rows differ from the checkpoint's ({stored.encoding} rounding)")


def _same_table(graph: Graph, stored: StoredWeight, encode, read_rows, vocab: int) -> bool:
    for start in range(0, vocab, TABLE_CHUNK_ROWS):
        stop = min(vocab, start + TABLE_CHUNK_ROWS)
        ours = encode(np.asarray(read_rows(start, stop), np.float32))
        for n, array in ours.items():
            init = stored.initializers.get(n)
            if init is None:
                return False
            axis = next(k for k, d in enumerate(init.dims) if d == vocab and array.shape[k] == stop - start)
            if stored_slice(init, graph.folder, axis, start, stop) != _bytes(np.ascontiguousarray(array), init):
                return False
    return True


def check_target(bundle: Path, source: TargetCheckpoint, recipes: dict[str, str], report: WeightReport) -> None:
    """Every decoder weight, norm and RoPE frequency of the checkpoint in the target graph, piece by piece."""
    graph = Graph(bundle / f"{TARGET}.onnx")
    for piece, name, value in target_weights(source):
        check_weight(report, graph, f"{piece}/{name}", f"target {name}", value.detach().float().numpy(),
                     recipes.get(piece, recipes.get(TARGET, "fp32")))


def check_drafter(bundle: Path, drafter: Drafter, recipe: str, report: WeightReport) -> None:
    """Every float weight of the assistant in the drafter graph."""
    graph = Graph(bundle / f"{DRAFTER}.onnx")
    for name, value in drafter.named_parameters():
        if value.is_floating_point():
            check_weight(report, graph, name, f"drafter {name}", value.detach().float().numpy(), recipe)


def check_tables(bundle: Path, source: TargetCheckpoint, recipes: dict[str, str], report: WeightReport) -> None:
    """The embedder's and per-layer embedder's tables, and the LM head's (the tied table, transposed)."""
    tables = [(EMBEDDER, "embed_tokens.weight", EMBEDDER, EMBEDDER)]
    if source.spec.ple_dim:
        tables.append((PER_LAYER_EMBEDDER, "embed_tokens_per_layer.weight", PER_LAYER_EMBEDDER, PER_LAYER_EMBEDDER))
    tables.append((TARGET, "embed_tokens.weight", EMBEDDER, HEAD))
    for model, local, owner, piece in tables:
        entry = source.entry(local, owner)
        label = "LM head table" if piece == HEAD else f"{owner.replace('_', ' ')} table"
        check_table(report, Graph(bundle / f"{model}.onnx"), f"{piece}/{local}", label,
                    lambda a, b: source.rows(entry, a, b).numpy(), entry.shape[0],
                    recipes.get(piece, recipes.get(model, "fp32")))
