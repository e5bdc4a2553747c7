"""ONNX Runtime backend: an edge-mtp ONNX bundle folder run with onnxruntime, KV shared zero-copy.

One numpy array per cache, wrapped once as an OrtValue (no copy), is bound with IOBinding as input AND output of
every target signature (the graph's ScatterElements then writes the new rows in place) and as input of the drafter:
target and drafter read and write the very same memory, as on the phone. Every other input and output is a
pre-allocated array bound the same way, so a step allocates nothing and copies only its own small inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...bundle.onnx_folder import contract_from_manifest, onnx_output_name, read_manifest
from ...model.contract import DECODE, DRAFT, EMBEDDER, PER_LAYER_EMBEDDER, TARGET, Signature
from ...util.errors import EdgeMtpError
from .base import Backend

# Short provider names (as on the command line) -> onnxruntime execution providers.
PROVIDERS = {"cpu": "CPUExecutionProvider", "xnnpack": "XnnpackExecutionProvider",
             "nnapi": "NnapiExecutionProvider", "coreml": "CoreMLExecutionProvider", "qnn": "QNNExecutionProvider"}


def _short(provider: str) -> str:
    return next((k for k, v in PROVIDERS.items() if v == provider), provider)


def resolve_provider(provider: str) -> list[str]:
    """onnxruntime providers for a short name (cpu, xnnpack, nnapi, coreml, qnn) or an ORT provider name, CPU last."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    name = PROVIDERS.get(provider.lower(), provider)
    if name not in PROVIDERS.values() and name not in available:
        raise EdgeMtpError(f"Unknown execution provider '{provider}'; choose one of {', '.join(PROVIDERS)} "
                           f"(this onnxruntime has: {', '.join(_short(p) for p in available)}).")
    if name not in available:
        raise EdgeMtpError(f"Execution provider '{provider}' ({name}) is not in this onnxruntime build; available: "
                           f"{', '.join(_short(p) for p in available)} (install the onnxruntime package built with it).")
    return [name] if name == PROVIDERS["cpu"] else [name, PROVIDERS["cpu"]]


@dataclass
class BoundSignature:
    """One signature bound once: its IOBinding, the arrays behind its inputs/outputs and the OrtValues wrapping them."""

    session: Any
    binding: Any
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    values: dict[str, Any] = field(default_factory=dict)  # keeps the wrapping OrtValues alive

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, value in feeds.items():
            np.copyto(self.inputs[name], value, casting="same_kind")
        self.session.run_with_iobinding(self.binding)
        return {name: array.copy() for name, array in self.outputs.items()}


class OnnxBackend(Backend):
    """Runs an ONNX bundle folder: embedder, per-layer embedder, target (one graph, every T) and drafter."""

    name = "onnx"

    def __init__(self, bundle_dir: str | Path, provider: str = "cpu", threads: int | None = None,
                 verify: bool = True):
        import onnxruntime as ort

        self.bundle_dir = Path(bundle_dir)
        self.providers = resolve_provider(provider)
        self.manifest = read_manifest(self.bundle_dir, verify=verify)
        self.contract = contract_from_manifest(self.manifest, str(self.bundle_dir / "manifest.json"))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        # The loop interleaves many short runs with Python work; spinning pool threads would steal its core.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions: dict[str, Any] = {}
        for model, record in self.manifest["models"].items():
            try:
                self.sessions[model] = ort.InferenceSession(str(self.bundle_dir / record["file"]), options,
                                                            providers=self.providers)
            except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated types
                raise EdgeMtpError(f"onnxruntime could not load {self.bundle_dir / record['file']} with "
                                   f"{self.providers[0]} ({str(e).splitlines()[0]}).") from None
        if TARGET not in self.sessions or EMBEDDER not in self.sessions:
            raise EdgeMtpError(f"{self.bundle_dir} has no target or embedder model; re-export the bundle.")
        # The KV state: one array per cache, each wrapped once. These OrtValues are bound everywhere.
        self.kv_arrays: dict[str, np.ndarray] = {s.name: s.zeros() for s in self.contract.kv_tensors()}
        self.kv_values: dict[str, Any] = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.kv_arrays.items()}
        self.bound: dict[str, BoundSignature] = {}
        for name in self.manifest["signatures"]:
            model = self.manifest["signatures"][name]["model"]
            self.bound[name] = self._bind(self.sessions[model], self._signature(name))

    def _signature(self, name: str) -> Signature:
        c = self.contract
        if name == EMBEDDER:
            return c.embedder()
        if name == PER_LAYER_EMBEDDER:
            return c.per_layer_embedder()
        if name == DRAFT:
            return c.drafter_signature()
        return next(s for s in c.target_signatures() if s.name == name)

    def _bind(self, session, signature: Signature) -> BoundSignature:
        import onnxruntime as ort

        binding = session.io_binding()
        bound = BoundSignature(session, binding, {}, {})
        for spec in signature.inputs:
            if spec.name in self.kv_values:
                binding.bind_ortvalue_input(spec.name, self.kv_values[spec.name])
                continue
            array = spec.zeros()
            bound.inputs[spec.name] = array
            bound.values[spec.name] = ort.OrtValue.ortvalue_from_numpy(array)
            binding.bind_ortvalue_input(spec.name, bound.values[spec.name])
        outputs = list(signature.outputs)
        if signature.name.startswith("prefill_"):  # the one target graph also yields logits/activations here
            outputs = list(self.contract.target_signature(DECODE, signature.inputs[0].shape[1]).outputs)
        for spec in outputs:
            graph_name = onnx_output_name(self.contract, spec.name)
            if spec.name in self.kv_values:
                binding.bind_ortvalue_output(graph_name, self.kv_values[spec.name])
                continue
            array = spec.zeros()
            bound.values[graph_name] = ort.OrtValue.ortvalue_from_numpy(array)
            binding.bind_ortvalue_output(graph_name, bound.values[graph_name])
            if spec in signature.outputs:
                bound.outputs[spec.name] = array
            else:
                bound.values[f"{graph_name}#array"] = array  # bound but not returned
        return bound

    # -- Backend ----------------------------------------------------------------------------------------------------

    def reset(self) -> None:
        for array in self.kv_arrays.values():
            array.fill(0.0)  # in place: every binding keeps pointing at the same memory

    def embed(self, token: int) -> tuple[np.ndarray, np.ndarray | None]:
        ids = {"token_ids": np.array([[token]], dtype=np.int32)}
        emb = self.bound[EMBEDDER].run(ids)["embeddings"]
        if PER_LAYER_EMBEDDER not in self.bound:
            return emb, None
        return emb, self.bound[PER_LAYER_EMBEDDER].run(ids)["per_layer_embeddings"]

    def run_target(self, signature: str, embeddings: np.ndarray, per_layer_embeddings: np.ndarray | None,
                   input_pos: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        if signature not in self.bound or self.manifest["signatures"][signature]["model"] != TARGET:
            raise EdgeMtpError(f"This bundle has no target signature '{signature}' (it has "
                               f"{', '.join(s.name for s in self.contract.target_signatures())}).")
        feeds = {"embeddings": embeddings, "input_pos": input_pos, "mask": mask}
        if per_layer_embeddings is not None:
            feeds["per_layer_embeddings"] = per_layer_embeddings
        return self.bound[signature].run(feeds)

    def run_drafter(self, activations: np.ndarray, input_pos: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        if DRAFT not in self.bound:
            raise EdgeMtpError("This bundle has no drafter; run with --no-mtp or export it with an assistant.")
        return self.bound[DRAFT].run({"activations": activations, "input_pos": input_pos, "mask": mask})

    # -- introspection (tests, debugging) ---------------------------------------------------------------------------

    def read_kv(self, name: str) -> np.ndarray:
        """A copy of one cache."""
        return self.kv_arrays[name].copy()

    def drafter_kv_values(self) -> dict[str, Any]:
        """The OrtValues bound as the drafter's cache inputs (the very objects the target writes)."""
        return {s.name: self.kv_values[s.name] for s in self.contract.drafter_kv_tensors()}


__all__ = ["OnnxBackend", "PROVIDERS", "resolve_provider"]
