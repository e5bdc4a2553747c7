"""Which ops of a LiteRT model LiteRT's GPU delegate would refuse, per signature, without a GPU.

The rules are those of the model builder that LiteRT's GPU accelerators share (ML Drift, in LiteRT's
`ml_drift_delegate/tflite/model_builder.cc`; the same checks are compiled into LiteRT-LM 0.18.1), restricted to what a
torch export can produce: the op must be one the builder parses, every tensor it reads or writes has rank <= 4,
no runtime tensor is 64-bit, GATHER takes 1-D int32 indices, SLICE constant bounds, TOPK_V2 a constant k. Of the
StableHLO composites it lowers, ours are the in-place cache ops `odml.cache_update` and `odml.runtime_bmm`.
LiteRT-LM's GPU executor asks for a fully delegated graph, so one finding makes it refuse the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..formats.tflite import builtin_names, schema

_SUPPORTED = frozenset("""
ABS ADD ADD_N ARG_MAX ATAN2 AVERAGE_POOL_2D BATCH_MATMUL BITCAST BITWISE_XOR CAST CEIL CONCATENATION CONV_2D COS
CUMSUM DEPTHWISE_CONV_2D DEPTH_TO_SPACE DEQUANTIZE DIV DYNAMIC_UPDATE_SLICE EMBEDDING_LOOKUP EQUAL ELU EXP FLOOR
FLOOR_DIV FLOOR_MOD FULLY_CONNECTED GATHER GELU GREATER GREATER_EQUAL HARD_SWISH LEAKY_RELU LESS LESS_EQUAL LOG
LOGICAL_AND LOGICAL_NOT LOGICAL_OR LOGISTIC LSTM MAXIMUM MAX_POOL_2D MEAN MINIMUM MIRROR_PAD MUL NEG NOT_EQUAL ONE_HOT
PACK PAD PADV2 POW PRELU QUANTIZE REDUCE_ALL REDUCE_ANY REDUCE_MAX REDUCE_MIN REDUCE_PROD RELU RELU6 RELU_0_TO_1
RELU_N1_TO_1 RESHAPE RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR REVERSE_V2 RIGHT_SHIFT ROUND RSQRT SELECT SELECT_V2 SIGN
SIN SLICE SOFTMAX SPACE_TO_DEPTH SPLIT SPLIT_V SQRT SQUARE SQUARED_DIFFERENCE STABLEHLO_BROADCAST_IN_DIM
STABLEHLO_CBRT STABLEHLO_CLAMP STABLEHLO_REMAINDER STABLEHLO_SHIFT_LEFT STRIDED_SLICE SUB SUM TANH TILE TOPK_V2
TRANSPOSE TRANSPOSE_CONV UNPACK
""".split()) | {"STABLEHLO_COMPOSITE odml.cache_update", "STABLEHLO_COMPOSITE odml.runtime_bmm"}  # model/kv_update.py
_WIDE = frozenset({"INT64", "UINT64", "FLOAT64", "COMPLEX64", "COMPLEX128", "STRING"})


@dataclass(frozen=True)
class Finding:
    """One op the GPU delegate would leave to the CPU: its index in the signature's graph, name and the reason."""

    index: int
    op: str
    reason: str


@dataclass
class SignatureReport:
    """The findings of one signature and its op count."""

    total: int
    findings: list[Finding]

    @property
    def delegated(self) -> int:
        """Ops the GPU delegate accepts."""
        return self.total - len(self.findings)


def check_model(model: bytes) -> dict[str, SignatureReport]:
    """Per signature of a .tflite flatbuffer: every op the GPU delegate would refuse, with the reason."""
    tfl = schema()
    op_names = builtin_names()
    type_names = {v: k for k, v in vars(tfl.TensorType).items() if not k.startswith("_")}
    root = tfl.Model.GetRootAsModel(model, 0)
    reports = {}
    for s in range(root.SignatureDefsLength()):
        sig = root.SignatureDefs(s)
        graph = root.Subgraphs(sig.SubgraphIndex())
        findings = []
        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            code = root.OperatorCodes(op.OpcodeIndex())
            name = op_names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "UNKNOWN")
            if name == "CUSTOM":
                name = f"CUSTOM {code.CustomCode().decode()}"
            elif name == "STABLEHLO_COMPOSITE":
                name = f"STABLEHLO_COMPOSITE {_composite_name(op)}"
            tensors = [graph.Tensors(t) for t in list(op.InputsAsNumpy()) + list(op.OutputsAsNumpy()) if t >= 0]
            reason = _refusal(name, op, graph, tensors, root, type_names)
            if reason:
                findings.append(Finding(i, name, reason))
        reports[sig.SignatureKey().decode()] = SignatureReport(graph.OperatorsLength(), findings)
    return reports


def _composite_name(op) -> str:
    """The name of a STABLEHLO_COMPOSITE op (e.g. odml.cache_update)."""
    table = op.BuiltinOptions2()
    options = schema().StableHLOCompositeOptions()
    options.Init(table.Bytes, table.Pos)
    return options.Name().decode()


def _constant(root, buffer: int) -> bool:
    """Whether a buffer holds data: inline, or after the flatbuffer at an offset (streamed export, models > 2 GB)."""
    if buffer <= 0:
        return False
    b = root.Buffers(buffer)
    return b.DataLength() > 0 or b.Offset() > 1


def _refusal(name: str, op, graph, tensors: list, root, type_names: dict) -> str | None:
    """Why the GPU delegate refuses this op, or None."""
    if name not in _SUPPORTED:
        return "operation is not supported"
    for t in tensors:
        if t.ShapeLength() > 4:
            return f"tensor {t.Name().decode()} has rank {t.ShapeLength()} (at most 4)"
        if not _constant(root, t.Buffer()) and type_names.get(t.Type()) in _WIDE:
            return f"tensor {t.Name().decode()} is {type_names.get(t.Type()).lower()} (no 64-bit types on the GPU)"

    def constant_input(k: int) -> bool:
        return _constant(root, graph.Tensors(op.Inputs(k)).Buffer())

    if name == "GATHER":
        indices = graph.Tensors(op.Inputs(1))
        if indices.ShapeLength() != 1 or type_names.get(indices.Type()) != "INT32":
            return "GATHER indices must be 1-D int32"
    if name == "SLICE" and not (constant_input(1) and constant_input(2)):
        return "SLICE bounds must be constant"
    if name == "TOPK_V2" and not constant_input(1):
        return "TOPK_V2 k must be constant"
    return None


def check_bundle(path: Path) -> dict[str, dict[str, SignatureReport]]:
    """check_model for every model of a .litertlm bundle, keyed by model name (embedder, target, drafter, ...)."""
    from ..bundle.litertlm import SECTION_MODEL_TYPES, read_litertlm

    bundle = read_litertlm(path)
    out = {}
    for name, model_type in SECTION_MODEL_TYPES.items():
        section = bundle.model_section(model_type)
        if section is not None:
            out[name] = check_model(bundle.read(section))
    return out


def report_dict(reports: dict[str, dict[str, SignatureReport]]) -> dict:
    """JSON form: {model: {signature: {delegated, total, refused: [{index, op, reason}]}}}."""
    return {m: {s: {"delegated": r.delegated, "total": r.total, "refused": [vars(f) for f in r.findings]}
                for s, r in sigs.items()} for m, sigs in reports.items()}


def describe(reports: dict[str, dict[str, SignatureReport]]) -> str:
    """One line per signature, then one line per op the GPU delegate would refuse."""
    lines = []
    for model, signatures in reports.items():
        for signature, r in signatures.items():
            verdict = "every op delegable" if not r.findings else f"{len(r.findings)} ops refused"
            lines.append(f"{model}/{signature}: {verdict} ({r.delegated}/{r.total})")
            lines += [f"  op {f.index} {f.op}: {f.reason}" for f in r.findings]
    return "\n".join(lines)
