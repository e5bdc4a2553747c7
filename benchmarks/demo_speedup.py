"""MTP end-to-end speed-up on the demo pair's exported bundle, on this CPU, as ratios measured in one run.

Both runtimes decode the same prompts with MTP off and on (alternating, best of three): Google's LiteRT-LM (C++,
its own benchmark counters) and our Python loop on LiteRT CompiledModel (edge-mtp bench's numbers).

    .venv/bin/python -m benchmarks.demo_speedup [--context 512] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from edge_mtp.demo import assistant_dir, target_dir
from edge_mtp.export.pipeline import export_litert
from edge_mtp.runtime.litertlm_engine import run_litertlm
from edge_mtp.util.prompts import DEFAULT_PROMPTS


def main() -> None:
    """Export the demo pair, then print tokens/s with MTP off and on, and the ratio, for both runtimes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "demo.litertlm"
        export_litert(target_dir(), assistant_dir(), bundle, context=args.context, prefill=(32, 128))
        best = {False: 0.0, True: 0.0}
        rate = None
        for _ in range(3):
            for mtp in (False, True):
                run = run_litertlm(bundle, DEFAULT_PROMPTS, args.max_tokens, args.context, mtp=mtp)
                best[mtp] = max(best[mtp], sum(run.decode_tokens_per_second) / len(run.decode_tokens_per_second))
                rate = run.success_rate if mtp else rate
        print(f"LiteRT-LM (C++), CPU: plain {best[False]:.0f} tok/s, MTP {best[True]:.0f} tok/s, "
              f"speed-up {best[True] / best[False]:.2f}x, drafter success rate {rate:.2f}")

        import edge_mtp
        from edge_mtp.bench import bench

        model = edge_mtp.load(bundle)
        result = bench(model.backend, [model.tokenizer.encode(p) for p in DEFAULT_PROMPTS], args.max_tokens)
        g = result.exported_draft_len
        print(f"edge-mtp Python loop on LiteRT, CPU: plain {result.baseline.tokens_per_second:.0f} tok/s, "
              f"MTP (G={g}) {result.mtp[-1].tokens_per_second:.0f} tok/s, speed-up {result.measured_speedup[g]:.2f}x "
              f"(predicted {result.predicted_speedup[g]:.2f}x)")


if __name__ == "__main__":
    main()
