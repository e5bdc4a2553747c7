"""LiteRT backend: the models straight out of a .litertlm, run with ai_edge_litert's CompiledModel.

One set of KV TensorBuffers, allocated by the runtime, is bound as input and output of every target signature
(updated in place) and as inputs of the drafter, exactly as on the phone: no KV byte is ever copied. (Wrapping numpy
memory with TensorBuffer.create_from_host_memory would give flat, dimensionless buffers that the signatures refuse:
"Cannot auto-resize tensor kv_cache_k_0".)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...contract import DRAFT, EMBEDDINGS, PLE, TOKEN_IDS, Contract
from ...errors import EdgeMtpError
from ...export.litertlm import read_litertlm
from ...spec import DrafterSpec, TargetSpec, spec_from_dict
from .base import Backend

ACCELERATORS = ("cpu", "gpu", "npu")
_MODEL_TYPES = {"embedder": "tf_lite_embedder", "per_layer_embedder": "tf_lite_per_layer_embedder",
                "target": "tf_lite_prefill_decode", "drafter": "tf_lite_mtp_drafter"}


def contract_from_manifest(manifest: dict, where: str) -> Contract:
    """The bundle's Contract, rebuilt from the manifest export wrote into it."""
    if not manifest or "target" not in manifest:
        raise EdgeMtpError(f"{where} has no edge-mtp manifest; only bundles written by edge-mtp export can be run here.")
    drafter = spec_from_dict(DrafterSpec, manifest["drafter"]) if manifest.get("drafter") else None
    return Contract(spec_from_dict(TargetSpec, manifest["target"]), drafter, manifest["context"],
                    manifest["draft_len"], tuple(manifest["prefill_lengths"]))


class LiteRTBackend(Backend):
    """Runs a .litertlm bundle's models with CompiledModel on cpu, gpu (WebGPU) or npu."""

    name = "litert"

    def __init__(self, bundle_path: Path, accelerator: str = "cpu", threads: int = 2):
        from ai_edge_litert.compiled_model import CompiledModel

        if accelerator not in ACCELERATORS:
            raise EdgeMtpError(f"Unknown accelerator '{accelerator}'; choose one of {', '.join(ACCELERATORS)}.")
        bundle = read_litertlm(bundle_path)
        self.contract = contract_from_manifest(bundle.manifest, str(bundle_path))
        self.accelerator = accelerator
        options = self._options(accelerator, threads)
        self.models = {}
        for name, model_type in _MODEL_TYPES.items():
            section = bundle.model_section(model_type)
            if section is None:
                continue
            try:
                self.models[name] = CompiledModel.from_buffer(bundle.read(section), options=options)
            except Exception as e:  # the accelerator could not take this model
                raise EdgeMtpError(f"The {accelerator} accelerator could not load the {name} model ({e}); "
                                   "use --accelerator cpu.") from None
        if "drafter" not in self.models:
            self.contract = Contract(self.contract.target, None, self.contract.context, self.contract.draft_len,
                                     self.contract.prefill_lengths)
        self.kv = {s.name: self.models["target"].create_input_buffer_by_name("decode", s.name)
                   for s in self.contract.kv_tensors()}
        self._zeros = {s.name: s.zeros() for s in self.contract.kv_tensors()}
        self._io: dict[tuple[str, str], tuple[dict, dict]] = {}
        self.reset()

    @staticmethod
    def _options(accelerator: str, threads: int):
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import CpuOptions, Options

        kind = {"cpu": HardwareAccelerator.CPU, "gpu": HardwareAccelerator.GPU, "npu": HardwareAccelerator.NPU}
        return Options(hardware_accelerators=kind[accelerator], cpu_options=CpuOptions(num_threads=threads))

    def _buffers(self, model: str, signature: str) -> tuple[dict, dict]:
        """Input/output buffers of a signature: the shared KV buffers plus this signature's own ones (cached)."""
        key = (model, signature)
        if key not in self._io:
            cm = self.models[model]
            details = cm.get_signature_list()[signature]
            ins = {n: self.kv[n] if n in self.kv else cm.create_input_buffer_by_name(signature, n)
                   for n in details["inputs"]}
            outs = {n: self.kv[n] if n in self.kv else cm.create_output_buffer_by_name(signature, n)
                    for n in details["outputs"]}
            self._io[key] = (ins, outs)
        return self._io[key]

    def _run(self, model: str, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ins, outs = self._buffers(model, signature)
        for name, value in inputs.items():
            ins[name].write(np.ascontiguousarray(value))
        self.models[model].run_by_name(signature, ins, outs)
        result = {}
        for name, buf in outs.items():
            if name in self.kv:
                continue
            d = buf.get_tensor_details()
            result[name] = buf.read(int(np.prod(d["shape"])), np.float32).reshape(d["shape"])
        return result

    def reset(self) -> None:
        for name, buf in self.kv.items():
            buf.write(self._zeros[name])

    def read_kv(self, name: str) -> np.ndarray:
        """A copy of one cache (for tests and debugging; the loop never reads caches)."""
        shape = self._zeros[name].shape
        return self.kv[name].read(int(np.prod(shape)), np.float32).reshape(shape)

    def embed(self, token: int) -> tuple[np.ndarray, np.ndarray | None]:
        ids = {TOKEN_IDS: np.array([[token]], dtype=np.int32)}
        emb = self._run("embedder", "embedder", ids)[EMBEDDINGS]
        if "per_layer_embedder" not in self.models:
            return emb, None
        return emb, self._run("per_layer_embedder", "per_layer_embedder", ids)[PLE]

    def run_target(self, signature, embeddings, per_layer_embeddings, input_pos, mask):
        inputs = {"embeddings": embeddings, "input_pos": input_pos, "mask": mask}
        if per_layer_embeddings is not None:
            inputs["per_layer_embeddings"] = per_layer_embeddings
        return self._run("target", signature, inputs)

    def run_drafter(self, activations, input_pos, mask):
        return self._run("drafter", DRAFT, {"activations": activations, "input_pos": input_pos, "mask": mask})
