"""Real-size `edge-mtp quantize`: quantize a finished fp32 ONNX bundle and print wall time, peak memory of the whole
process tree (overall and per stage: each graph's rewrite, then the report's measurement) and the report's numbers.

    python -m benchmarks.export_scale --preset e2b --quant fp32 --format onnx --out e2b-fp32-onnx   # the source
    python -m benchmarks.quantize_scale e2b-fp32-onnx --quant int4 --out e2b-int4-q [--json result.json]

Not a test: E2B takes minutes on 2 cores. The test suite bounds the same path's memory on the wide preset.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from edge_mtp.util.memory import PeakMemory


def main() -> None:
    """Quantize one bundle and print what it cost."""
    from edge_mtp.export.onnx_requantize import quantize_onnx_bundle

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--quant", default="int4")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    start = time.time()
    stages: list[tuple[str, float, float]] = []  # (stage, seconds, peak RSS GiB)
    current = ["reading and verifying the fp32 bundle", start]
    memory = PeakMemory()
    overall = 0
    last_print = [0.0]

    def stage(text: str) -> None:
        nonlocal overall
        now = time.time()
        peak = memory.restart()
        overall = max(overall, peak)
        stages.append((current[0], now - current[1], peak / 2**30))
        current[:] = [text, now]
        print(f"[{now - start:7.1f} s] {text}", flush=True)

    def progress(what: str, done: int, total: int) -> None:
        if time.time() - last_print[0] > 10 or done == total:
            last_print[0] = time.time()
            print(f"[{time.time() - start:7.1f} s]   {done}/{total} {what}", flush=True)

    with memory:
        manifest = quantize_onnx_bundle(args.bundle, args.out, args.quant, on_stage=stage, on_progress=progress)
        stage("done")
    overall = max(overall, memory.peak)
    report = manifest["quantization_report"]
    size = sum(f["bytes"] for f in manifest["files"].values())
    result = {"bundle": str(args.bundle), "quant": args.quant, "seconds": time.time() - start,
              "peak_rss_gib": overall / 2**30, "bundle_bytes": size, "stage_seconds": stages,
              "logit_relative_error": report["logit_relative_error"], "top1_agreement": report["top1_agreement"],
              "drafter_acceptance_fp32": report["drafter_acceptance_fp32"],
              "drafter_acceptance_quantized": report["drafter_acceptance_quantized"],
              "components": report["components"]}
    print(f"\n{args.quant}: {result['seconds'] / 60:.1f} min, peak RSS (process tree) {overall / 2**30:.2f} GiB, "
          f"bundle {size / 2**30:.2f} GiB, top-1 {report['top1_agreement']:.3f}, "
          f"logit error {report['logit_relative_error']:.4f}")
    for text, seconds, peak in stages:
        print(f"  {seconds:8.1f} s  {peak:6.2f} GiB peak RSS  {text}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
