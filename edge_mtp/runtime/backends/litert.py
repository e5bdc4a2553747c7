"""LiteRT backend: the models straight out of a .litertlm, run with ai_edge_litert's CompiledModel.

One set of KV TensorBuffers, allocated by the runtime, is bound as input and output of every target signature
(updated in place) and as inputs of the drafter, exactly as on the phone. (Wrapping numpy memory with
TensorBuffer.create_from_host_memory would give flat, dimensionless buffers that the signatures refuse:
"Cannot auto-resize tensor kv_cache_k_0".)

All models live in one LiteRT Environment, so buffers of one model can be bound to another. On the GPU accelerator
(WebGPU via Dawn, with the CPU running the ops it cannot take) every input and output states the buffer types it
accepts, and they differ between signatures: a cache may need a WebGPU buffer where a GPU partition reads it first
and host memory where a CPU partition does. A WebGPU buffer bound where host memory is required is silently not
written back (the cache keeps stale rows), while host memory bound to a WebGPU slot is copied in and out by the
runtime. So a cache gets the type every user accepts when there is one, else host memory.

Each model is compiled from a file of its own (the section's bytes, in a private temporary folder), which LiteRT
maps: a table is resident only where it is read (the E2B per-layer embedder, 1.1 GB: 0.01 GiB). Each model packs its
weights for XNNPACK into a weight-cache file beside it: without
it every signature packs a private copy, so a target with prefill, decode and verify signatures holds its weights
three to four times over (measured on the wide preset: 268 MiB resident for a 70 MiB int8 target, 97 MiB with it;
E2B int8 bundle: 10.5 GiB, 7.7 GiB with it). See _compile for the one limit found (disk space).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ...bundle.litertlm import SECTION_MODEL_TYPES, read_litertlm
from ...bundle.manifest import checked_contract
from ...model.contract import DRAFT, EMBEDDINGS, PARAM_TENSOR, PLE, TOKEN_IDS, param_values
from ...util.errors import EdgeMtpError
from ..gpu_check import check_model
from .base import Backend
from .inline import inline_composites

ACCELERATORS = ("cpu", "gpu", "npu")
HOST_MEMORY = 1  # LiteRtTensorBufferType kLiteRtTensorBufferTypeHostMemory
log = logging.getLogger(__name__)
# XNNPACK aborts the process ("cannot append buffer to cache file") when its weight-cache file cannot be written,
# which is what a full disk does (it did so for the E4B int8 target while an export's temporary files and stale
# templates filled the disk). A model gets its file and cache only where the disk holds three times the model plus
# this margin (see _compile).
WEIGHT_CACHE_DISK_MARGIN = 1 << 30
# XNNPACK's QS8 and QU8 (its defaults) plus DYNAMIC_FULLY_CONNECTED: without that flag a fully-connected layer whose
# weights are computed in the graph falls back to LiteRT's builtin kernels, and attention is two of those (the cache
# is the weight operand of q k^T, the probabilities that of p v). One E2B full-attention layer at context 4096
# (benchmarks/attention_flags.py): 10.6 ms for 1 token and 34.9 ms for 4 without it, 2.9 and 3.8 ms with it. It also
# keeps a verify row equal to a decode (greedy MTP output equal to plain output): the builtin kernels sum p.v over
# the 4 x G rows of a verify in another order than over the G rows of a decode (1.9e-6 to 4.6e-5 apart, measured at
# context 256), XNNPACK in the same order.
XNNPACK_FLAGS = 0x1 | 0x2 | 0x8
_availability: dict[str, str | None] = {}  # accelerator -> why it cannot be used (None: usable), probed once


class LiteRTBackend(Backend):
    """Runs a .litertlm bundle's models with CompiledModel on cpu, gpu (WebGPU) or npu."""

    name = "litert"

    def __init__(self, bundle_path: Path, accelerator: str = "cpu", threads: int = 2):
        if accelerator not in ACCELERATORS:
            raise EdgeMtpError(f"Unknown accelerator '{accelerator}'; choose one of {', '.join(ACCELERATORS)}.")
        bundle = read_litertlm(bundle_path)
        self.contract = checked_contract(bundle.manifest, str(bundle_path))
        self.environment = _environment()
        self.requested_accelerator, self.accelerator, self.fallback_reason = accelerator, accelerator, None
        if accelerator != "cpu":
            embedder = bundle.model_section(SECTION_MODEL_TYPES["embedder"])
            reason = accelerator_unavailable(accelerator, bundle.read(embedder), self.environment)
            if reason is not None:  # CPU fallback with one clear line
                self.accelerator, self.fallback_reason = "cpu", reason
                log.warning("edge-mtp: the %s accelerator is unavailable (%s); running on the CPU.", accelerator, reason)
        self._workdir = tempfile.TemporaryDirectory(prefix="edge-mtp-litert-")
        self.models, self.delegation = {}, {}
        for name, model_type in SECTION_MODEL_TYPES.items():
            section = bundle.model_section(model_type)
            if section is None:
                continue
            model = bundle.read(section) if self.accelerator == "gpu" else None
            if self.accelerator == "gpu" and self.contract.param_tensor:
                model = inline_composites(model)  # the in-place cache composites need LiteRT-LM's options (inline.py)
            if self.accelerator == "gpu":  # ops the GPU delegate takes / all ops, per signature (see gpu_check)
                self.delegation[name] = {s: [r.delegated, r.total] for s, r in check_model(model).items()}
            try:
                self.models[name] = self._compile(bundle, section, name, model, threads)
            except Exception as e:  # the accelerator could not take this model
                hint = ("use --accelerator cpu" if self.accelerator != "cpu" else
                        "`edge-mtp inspect` checks its sections; an intact bundle that fails here was written by an "
                        "exporter this LiteRT cannot read: re-export it with this edge-mtp")
                raise EdgeMtpError(f"LiteRT on the {self.accelerator} could not load the {name} model of "
                                   f"{bundle_path} ({_first_line(e)}); {hint}.") from None
        if "drafter" not in self.models:
            self.contract = dataclasses.replace(self.contract, drafter=None)
        self.fully_accelerated = {name: cm.is_fully_accelerated() for name, cm in self.models.items()}
        self.kv = {s.name: self._kv_buffer(s.name) for s in self.contract.kv_tensors()}
        self._zeros = {s.name: s.zeros() for s in self.contract.kv_tensors()}
        self._io: dict[tuple[str, str], tuple[dict, dict]] = {}
        self.reset()

    def _compile(self, bundle, section, name: str, model: bytes | None, threads: int):
        """One model, compiled from a file of its own that LiteRT maps (so a table is resident only where read) with
        an XNNPACK weight cache beside it; from memory and without a cache when the disk cannot hold the two."""
        from ai_edge_litert.compiled_model import CompiledModel

        folder, size = Path(self._workdir.name), section.end - section.begin
        if shutil.disk_usage(folder).free < 3 * size + WEIGHT_CACHE_DISK_MARGIN:
            log.warning("edge-mtp: too little free disk in %s for the %s model's file and XNNPACK weight cache "
                        "(%.1f GiB); it is held in memory and its weights packed once per signature instead.",
                        folder, name, 3 * size / 2**30)
            options = self._options(self.accelerator, threads, None)
            model = model if model is not None else bundle.read(section)
            return CompiledModel.from_buffer(model, options=options, environment=self.environment)
        path = folder / f"{name}.tflite"
        if model is None:
            bundle.extract(section, path)
        else:
            path.write_bytes(model)
        options = self._options(self.accelerator, threads, folder / f"{name}.cache")
        return CompiledModel.from_file(str(path), options=options, environment=self.environment)

    @staticmethod
    def _options(accelerator: str, threads: int, weight_cache: Path | None):
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import CpuOptions, GpuOptions, Options

        cpu = CpuOptions(num_threads=threads, xnnpack_flags=XNNPACK_FLAGS,
                         xnnpack_weight_cache_path=str(weight_cache or ""))
        if accelerator == "cpu":
            return Options(hardware_accelerators=HardwareAccelerator.CPU, cpu_options=cpu)
        kind = {"gpu": HardwareAccelerator.GPU, "npu": HardwareAccelerator.NPU}[accelerator]
        # The CPU runs what the accelerator cannot take; f32 on the GPU keeps greedy tokens identical to the CPU's.
        return Options(hardware_accelerators=kind | HardwareAccelerator.CPU, cpu_options=cpu,
                       gpu_options=GpuOptions(enforce_f32=True))

    def _kv_buffer(self, name: str):
        """One shared cache buffer, of a type that every signature binding it accepts (see module docstring)."""
        uses = []  # (supported types, factory) for every input/output slot named `name`
        for model in ("target", "drafter"):
            cm = self.models.get(model)
            if cm is None:
                continue
            for signature, details in cm.get_signature_list().items():
                index = cm.get_signature_index(signature)
                for kind in ("inputs", "outputs"):
                    if name not in details[kind]:
                        continue
                    slot = details[kind].index(name)
                    if kind == "inputs":
                        types = cm.get_input_buffer_requirements(slot, index)["supported_types"]
                        make = lambda cm=cm, s=signature: cm.create_input_buffer_by_name(s, name)  # noqa: E731
                    else:
                        types = cm.get_output_buffer_requirements(slot, index)["supported_types"]
                        make = lambda cm=cm, s=signature: cm.create_output_buffer_by_name(s, name)  # noqa: E731
                    uses.append((list(types), make))
        wanted = set.intersection(*(set(t) for t, _ in uses)) or {HOST_MEMORY}
        for types, make in uses:
            if types and types[0] in wanted:  # the factory allocates the slot's first (preferred) type
                return make()
        raise EdgeMtpError(f"No buffer type fits every use of cache {name} on the {self.accelerator} accelerator "
                           f"(types per use: {[t for t, _ in uses]}); use --accelerator cpu.")

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
        zeros = self._zeros[name]
        return self.kv[name].read(zeros.size, zeros.dtype).reshape(zeros.shape)

    def embed(self, token: int) -> tuple[np.ndarray, np.ndarray | None]:
        ids = {TOKEN_IDS: np.array([[token]], dtype=np.int32)}
        emb = self._run("embedder", "embedder", ids)[EMBEDDINGS]
        if "per_layer_embedder" not in self.models:
            return emb, None
        return emb, self._run("per_layer_embedder", "per_layer_embedder", ids)[PLE]

    def run_target(self, signature, embeddings, per_layer_embeddings, input_pos, mask):
        inputs = {"embeddings": embeddings, "input_pos": input_pos, "mask": mask}
        if self.contract.param_tensor:
            inputs[PARAM_TENSOR] = param_values(int(input_pos[0]), len(input_pos))
        if per_layer_embeddings is not None:
            inputs["per_layer_embeddings"] = per_layer_embeddings
        return self._run("target", signature, inputs)

    def run_drafter(self, activations, input_pos, mask):
        inputs = {"activations": activations, "input_pos": input_pos, "mask": mask}
        if self.contract.param_tensor:  # LiteRT-LM's {N-1, N, N}
            inputs[PARAM_TENSOR] = param_values(int(input_pos[0]), 1)
        return self._run("drafter", DRAFT, inputs)


def _first_line(error: Exception) -> str:
    """The most specific line of a LiteRT error (its messages are multi-line traces)."""
    lines = [ln.strip(" └") for ln in str(error).splitlines() if ln.strip(" └")]
    return lines[-1] if lines else type(error).__name__


def _environment():
    """A LiteRT Environment for all models of a backend (buffers can only be shared within one environment)."""
    import ai_edge_litert
    from ai_edge_litert.compiled_model import Environment, EnvironmentOptions

    return Environment.create(options=EnvironmentOptions(runtime_path=os.path.dirname(ai_edge_litert.__file__)))


def accelerator_unavailable(accelerator: str, probe_model: bytes, environment=None) -> str | None:
    """Why `accelerator` cannot run here (a short reason), or None when it can; probed once per process.

    The probe compiles a small, fully delegable model (the bundle's embedder) with the accelerator alone: LiteRT
    then delegates it or fails; only "Some ops are not accelerated" still proves that the accelerator exists.
    """
    if accelerator == "cpu":
        return None
    if accelerator in _availability:
        return _availability[accelerator]
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    from ai_edge_litert.options import GpuOptions, Options

    kind = {"gpu": HardwareAccelerator.GPU, "npu": HardwareAccelerator.NPU}[accelerator]
    reason = None
    try:
        CompiledModel.from_buffer(probe_model, environment=environment or _environment(),
                                  options=Options(hardware_accelerators=kind, gpu_options=GpuOptions(enforce_f32=True)))
    except Exception as e:
        if accelerator == "gpu":
            reason = None if "not accelerated" in str(e) else _gpu_reason()
        elif "not accelerated" in str(e):  # no vendor runtime: every op was left to the (excluded) CPU
            reason = "no NPU vendor dispatch library or compiler plugin took the model"
        else:
            reason = _first_line(e)
    _availability[accelerator] = reason
    return reason


def _gpu_reason() -> str:
    """Why LiteRT's WebGPU accelerator (Dawn over Vulkan on Linux) found no adapter."""
    devices = vulkan_devices()
    if isinstance(devices, str):
        return devices
    if not devices:
        return "no Vulkan device; for a software one run scripts/install_software_gpu.sh and source its env.sh"
    return f"LiteRT's WebGPU accelerator found no usable adapter among the Vulkan devices {', '.join(devices)}"


def vulkan_devices() -> list[str] | str:
    """Names of the Vulkan physical devices the loader sees, or a sentence saying why none can be listed."""
    import ctypes

    try:
        vk = ctypes.CDLL("libvulkan.so.1")
    except OSError:
        return "no Vulkan loader libvulkan.so.1 (apt-get install libvulkan1)"
    u32, ptr = ctypes.c_uint32, ctypes.c_void_p

    class AppInfo(ctypes.Structure):
        _fields_ = [("sType", ctypes.c_int), ("pNext", ptr), ("app", ctypes.c_char_p), ("appVersion", u32),
                    ("engine", ctypes.c_char_p), ("engineVersion", u32), ("apiVersion", u32)]

    class CreateInfo(ctypes.Structure):
        _fields_ = [("sType", ctypes.c_int), ("pNext", ptr), ("flags", u32), ("app", ptr), ("layers", u32),
                    ("layerNames", ptr), ("extensions", u32), ("extensionNames", ptr)]

    class Properties(ctypes.Structure):
        _fields_ = [("apiVersion", u32), ("driverVersion", u32), ("vendorID", u32), ("deviceID", u32),
                    ("deviceType", ctypes.c_int), ("deviceName", ctypes.c_char * 256), ("rest", ctypes.c_byte * 1024)]

    vk.vkCreateInstance.argtypes = [ptr, ptr, ptr]
    vk.vkEnumeratePhysicalDevices.argtypes = [ptr, ptr, ptr]
    vk.vkGetPhysicalDeviceProperties.argtypes = [ptr, ptr]
    vk.vkDestroyInstance.argtypes = [ptr, ptr]
    app = AppInfo(0, None, b"edge-mtp", 1, None, 0, (1 << 22) | (1 << 12))  # sType 0: APPLICATION_INFO, API 1.1
    info = CreateInfo(1, None, 0, ctypes.addressof(app), 0, None, 0, None)  # sType 1: INSTANCE_CREATE_INFO
    instance = ptr()
    if vk.vkCreateInstance(ctypes.byref(info), None, ctypes.byref(instance)) != 0:
        return "no Vulkan driver (vkCreateInstance failed); for a software one run scripts/install_software_gpu.sh"
    try:
        count = u32(0)
        vk.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), None)
        handles = (ptr * max(count.value, 1))()
        vk.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), handles)
        names = []
        for i in range(count.value):
            props = Properties()
            vk.vkGetPhysicalDeviceProperties(handles[i], ctypes.byref(props))
            names.append(props.deviceName.decode(errors="replace"))
        return names
    finally:
        vk.vkDestroyInstance(instance, None)
