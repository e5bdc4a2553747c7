"""Does an ONNX decode step cost the same at a long context? ms/step at C=4096 (and 16384) divided by ms/step at 256.

The target graph is exported exactly as `export_onnx` does (one dynamic-T graph, ScatterElements cache writes) at
each context, and run the way OnnxBackend runs it: the caches bound with IOBinding as input and output of the same
OrtValue. If the cache update were not in place, every step would copy all caches (O(context)); attention over the
full static cache is the only O(context) work left. Target: ratio <= 1.3 at 4096.

`--copying` also times the same graphs with the cache outputs bound to separate buffers (what an exporter or runtime
that does not update in place costs), as a control.

    .venv/bin/python -m benchmarks.onnx_context [--geometry wide|wide-mqa] [--threads 1] [--rounds 7] [--copying]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edge_mtp.checkpoint.spec import TARGET_PRESETS
from edge_mtp.export.onnx_format import export_target_graph
from edge_mtp.model.contract import DECODE, Contract, causal_mask, kv_output_name
from edge_mtp.model.target import Target

GEOMETRIES = {
    # 12 layers, 6 of them own a cache (5 sliding hd64 + 1 full hd128), 2 KV heads: KV at 4096 ~ 11% of the weights.
    "wide": TARGET_PRESETS["wide"],
    # The same with one KV head, like E2B (whose KV at 4096 is ~2% of its weights): KV at 4096 ~ 5% of the weights.
    "wide-mqa": dataclasses.replace(TARGET_PRESETS["wide"], num_kv_heads=1),
}
CONTEXTS = (256, 4096, 16384)


def build_target(spec) -> Target:
    """A randomly initialised fp32 target (weights do not matter for timing)."""
    torch.manual_seed(0)
    target = Target(spec).eval()
    with torch.no_grad():
        target.embed_tokens.weight.normal_(0, 0.02)
    return target


class Stepper:
    """One decode step bound the way OnnxBackend binds it; `in_place=False` binds the cache outputs elsewhere."""

    def __init__(self, path: Path, contract: Contract, threads: int, in_place: bool = True,
                 profile: str | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if profile:
            options.enable_profiling, options.profile_file_prefix = True, profile
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        sig = contract.target_signature(DECODE, 1)
        rng = np.random.default_rng(0)
        position = contract.context - 8
        feeds = {"input_pos": np.array([position], np.int32), "mask": causal_mask(position, 1, contract.context)}
        self.keep = []
        self.binding = self.session.io_binding()
        for spec in sig.inputs:
            array = feeds.get(spec.name)
            if array is None:
                array = (rng.standard_normal(spec.shape) * (0.5 if spec.name.startswith("kv") else 1.0)).astype(
                    np.float32)
            value = ort.OrtValue.ortvalue_from_numpy(array)
            self.keep += [array, value]
            self.binding.bind_ortvalue_input(spec.name, value)
            if spec.name.startswith("kv_cache"):
                out = value if in_place else ort.OrtValue.ortvalue_from_numpy(np.empty_like(array))
                self.keep.append(out)
                self.binding.bind_ortvalue_output(kv_output_name(spec.name), out)
        for spec in sig.outputs[:2]:
            array = spec.zeros()
            value = ort.OrtValue.ortvalue_from_numpy(array)
            self.keep += [array, value]
            self.binding.bind_ortvalue_output(spec.name, value)

    def step_ms(self, steps: int) -> list[float]:
        """ms of each of `steps` decode steps."""
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            self.session.run_with_iobinding(self.binding)
            times.append(time.perf_counter() - t)
        return [1000 * t for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="wide")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7, help="rounds of --steps steps; the minimum step is reported")
    parser.add_argument("--steps", type=int, default=20, help="decode steps per round")
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    parser.add_argument("--copying", action="store_true", help="also time cache outputs bound to separate buffers")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    spec = GEOMETRIES[args.geometry]
    target = build_target(spec)
    params = sum(p.numel() for p in target.parameters())
    steppers: dict[tuple[int, bool], Stepper] = {}
    with tempfile.TemporaryDirectory(prefix="edge-mtp-bench-") as tmp:
        for context in contexts:
            contract = Contract(spec, None, context, 3, (32,))
            t0 = time.time()
            path = export_target_graph(target, contract, Path(tmp) / f"target_{context}.onnx")
            kv = sum(int(np.prod(s.shape)) for s in contract.kv_tensors())
            print(f"exported C={context:>6} in {time.time() - t0:4.1f} s; KV {kv * 4 / 2**20:7.1f} MiB = "
                  f"{kv / params:6.1%} of the {params * 4 / 2**20:.0f} MiB of weights", flush=True)
            for in_place in (True, False) if args.copying else (True,):
                steppers[context, in_place] = Stepper(path, contract, args.threads, in_place)
        for stepper in steppers.values():
            stepper.step_ms(5)  # warm-up
        times: dict[tuple[int, bool], list[float]] = {key: [] for key in steppers}
        for _ in range(args.rounds):  # interleaved, so machine noise hits every context alike
            for key, stepper in steppers.items():
                times[key] += stepper.step_ms(args.steps)
        best = {key: min(t) for key, t in times.items()}
        median = {key: float(np.median(t)) for key, t in times.items()}
    print(f"\ngeometry {args.geometry}, {args.threads} thread(s), decode ms/step: min (median) over "
          f"{args.rounds} x {args.steps} steps")
    base = contexts[0]
    for in_place in (True, False) if args.copying else (True,):
        label = "in place (OnnxBackend)" if in_place else "copying caches (control)"
        row = "  ".join(f"C={c}: {best[c, in_place]:.2f} ({median[c, in_place]:.2f}) ms" for c in contexts)
        ratios = "  ".join(f"{c}/{base}: {best[c, in_place] / best[base, in_place]:.2f}" for c in contexts[1:])
        print(f"{label:<26} {row}   ratio {ratios}")


if __name__ == "__main__":
    main()
