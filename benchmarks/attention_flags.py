"""One attention layer on LiteRT's CPU with and without XNNPACK's DYNAMIC_FULLY_CONNECTED flag.

Our graphs compute attention as fully-connected layers whose weights are tensors of the graph (the KV cache for
q k^T, the probabilities for p v). XNNPACK takes such layers only with that flag (our runtime sets it:
runtime/backends/litert.XNNPACK_FLAGS); without it LiteRT runs them in its builtin kernels, at a cost linear in the
query rows. Prints ms for 1 and 4 query tokens (decode, verify) at a full layer's size (E2B's by default).

    python -m benchmarks.attention_flags [--context 4096] [--head-dim 512] [--heads 8] [--kv-heads 1]

Not a test: ratios measured on this machine in one run (best of interleaved rounds).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


class Attention(torch.nn.Module):
    """The graph's attention (model.layers.attend) over a cache given as inputs."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from edge_mtp.model.layers import attend

        return attend(q, k, v, mask)


def compiled(path: Path, flags: int | None, inputs: tuple[torch.Tensor, ...]):
    """A CPU CompiledModel of `path` with its input buffers written once: (model, inputs, outputs)."""
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    from ai_edge_litert.options import CpuOptions, Options

    cpu = CpuOptions(num_threads=2) if flags is None else CpuOptions(num_threads=2, xnnpack_flags=flags)
    model = CompiledModel.from_file(str(path), options=Options(hardware_accelerators=HardwareAccelerator.CPU,
                                                               cpu_options=cpu))
    ins, outs = model.create_input_buffers(0), model.create_output_buffers(0)
    for buffer, value in zip(ins, inputs):
        buffer.write(value.numpy())
    return model, ins, outs


def main() -> None:
    """Convert the layer for 1 and 4 query tokens and time it under both flag settings."""
    import litert_torch

    from edge_mtp.util.quiet import converter_output_quiet
    from edge_mtp.runtime.backends.litert import XNNPACK_FLAGS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--head-dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    c, hd, h, hkv = args.context, args.head_dim, args.heads, args.kv_heads
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in (1, 4):
            inputs = (torch.randn(1, h, tokens, hd), torch.randn(1, hkv, c, hd), torch.randn(1, hkv, hd, c),
                      torch.zeros(1, 1, tokens, c))
            path = Path(tmp) / f"attention{tokens}.tflite"
            with converter_output_quiet():
                litert_torch.convert(Attention().eval(), inputs).export(str(path))
            for label, flags in (("LiteRT default", None), ("with DYNAMIC_FULLY_CONNECTED", XNNPACK_FLAGS)):
                runs[(label, tokens)] = compiled(path, flags, inputs)
        best = {key: float("inf") for key in runs}
        for _ in range(args.rounds):
            for key, (model, ins, outs) in runs.items():
                model.run_by_index(0, ins, outs)
                start = time.perf_counter()
                for _ in range(5):
                    model.run_by_index(0, ins, outs)
                best[key] = min(best[key], (time.perf_counter() - start) / 5 * 1000)
    print(f"one attention layer, context {c}, head dim {hd}, {h} heads / {hkv} KV heads, 2 threads (ms, best of "
          f"{args.rounds})")
    for label in ("LiteRT default", "with DYNAMIC_FULLY_CONNECTED"):
        one, four = best[(label, 1)], best[(label, 4)]
        print(f"  {label:<30} 1 token {one:8.2f}   4 tokens {four:8.2f}   ratio {four / one:5.2f}")


if __name__ == "__main__":
    main()
