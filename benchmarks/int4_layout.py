"""How LiteRT's CPU (XNNPACK) multiplies each weight layout at 1 to 32 input rows: why `int4` is channelwise.

A decode multiplies one row, a verify G+1 rows, a prefill 32 or 128. Prints ms per call of 8 fully-connected layers
(hidden <-> intermediate, E2B's sizes by default) for every weight recipe, and each row count's cost relative to
one row.

    python -m benchmarks.int4_layout [--hidden 1536] [--intermediate 6144] [--rows 1,2,4,8,32] [--threads 2]

Not a test: a ratio measured on this machine, in one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

LAYOUTS = ("int8", "int4", "int4-b32", "int4-b128")


class Feedforward(torch.nn.Module):
    """Four up/down projection pairs, summed: 8 weight matrices of one layer's sizes."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.up = torch.nn.ModuleList(torch.nn.Linear(hidden, intermediate, bias=False) for _ in range(4))
        self.down = torch.nn.ModuleList(torch.nn.Linear(intermediate, hidden, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(down(up(x)) for up, down in zip(self.up, self.down))


def ms_per_call(path: Path, rows: int, hidden: int, threads: int, calls: int) -> float:
    """Median ms of one call of the model at `path` on LiteRT's CPU."""
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    from ai_edge_litert.options import CpuOptions, Options

    options = Options(hardware_accelerators=HardwareAccelerator.CPU, cpu_options=CpuOptions(num_threads=threads))
    model = CompiledModel.from_file(str(path), options=options)
    inputs, outputs = model.create_input_buffers(0), model.create_output_buffers(0)
    inputs[0].write(np.random.default_rng(0).standard_normal((1, rows, hidden)).astype(np.float32))
    times = []
    for i in range(calls + 5):
        start = time.perf_counter()
        model.run_by_index(0, inputs, outputs)
        if i >= 5:
            times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def main() -> None:
    """Convert, quantize and time the layers for every layout and row count."""
    import litert_torch

    from edge_mtp.export.quantize import component_recipe, quantize_file
    from edge_mtp.util.quiet import converter_output_quiet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=6144)
    parser.add_argument("--rows", default="1,2,4,8,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    module = Feedforward(args.hidden, args.intermediate).eval()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for n in rows:
            fp32 = Path(tmp) / f"rows{n}.tflite"
            with converter_output_quiet():
                litert_torch.convert(module, (torch.randn(1, n, args.hidden),)).export(str(fp32))
                for layout in LAYOUTS:
                    quantize_file(fp32, component_recipe(layout), Path(tmp) / f"rows{n}.{layout}.tflite")
        for layout in LAYOUTS:
            results[layout] = [ms_per_call(Path(tmp) / f"rows{n}.{layout}.tflite", n, args.hidden, args.threads,
                                           args.calls) for n in rows]
    print(f"ms per call, 8 FC layers {args.hidden} <-> {args.intermediate}, {args.threads} thread(s); "
          f"(x) = cost relative to 1 row")
    print(f"{'recipe':<11}" + "".join(f"{f'{n} rows':>18}" for n in rows))
    for layout, ms in results.items():
        print(f"{layout:<11}" + "".join(f"{m:>9.2f} ({m / ms[0]:4.2f}x)" for m in ms))


if __name__ == "__main__":
    main()
