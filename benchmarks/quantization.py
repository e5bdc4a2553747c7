"""What each quantization recipe costs and gains on the trained demo pair, in both formats.

For every recipe × format: bundle size, and from the bundle's own quantization_report (measured at export against
the fp32 twin on the default prompt set): max logit relative error and top-1 agreement along the fp32 greedy
continuation, drafter acceptance (accepted / drafted, draft length 3). Then one greedy generation per prompt with MTP
and one without on our loop (LiteRTBackend / OnnxBackend, CPU): MTP speed-up = tokens/s with MTP ÷ tokens/s plain
(one run each, so a noisy machine shows up in it), plus that run's acceptance; for LiteRT also the same prompts in
Google's LiteRT-LM engine (its decode tokens/s with and without MTP, and the success rate it logs).

ONNX bundles other than fp32 are quantized from the fp32 bundle (quantize_onnx_bundle, the same code path as
`export --format onnx --quant`); LiteRT bundles are exported per recipe.

    .venv/bin/python -m benchmarks.quantization [--formats onnx,litert] [--recipes fp32,int8,...] [--context 256]
                                                [--max-tokens 64] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

RECIPES = ("fp32", "fp16", "int8", "int4", "int4-b64", "int4-b128", "mixed")  # int4 is int4-b32
SPEED_PROMPTS = ["def fibonacci(n):", "The quick brown fox", "import os", "Return a list of the"]


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size


def _speed(backend, tokenizer, max_tokens: int) -> dict:
    from edge_mtp.runtime.speculative import generate_tokens

    rate = {}
    accepted = drafted = 0
    for mtp in (False, True):
        tokens = seconds = 0.0
        for prompt in SPEED_PROMPTS:
            _, stats = generate_tokens(backend, tokenizer.encode(prompt), max_tokens=max_tokens, mtp=mtp)
            tokens += stats.generated - 1
            seconds += (stats.total_ms - stats.time_to_first_token_ms) / 1000
            if mtp:
                accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
        rate[mtp] = tokens / seconds
    return {"tokens_per_second_plain": rate[False], "tokens_per_second_mtp": rate[True],
            "speedup": rate[True] / rate[False], "run_acceptance": accepted / drafted if drafted else None}


def _engine_speed(bundle: Path, context: int, max_tokens: int) -> dict:
    """MTP speed-up in Google's LiteRT-LM (its C++ loop, CPU), from the decode tokens/s it reports per prompt."""
    from edge_mtp.runtime.litertlm_engine import run_litertlm

    rate, acceptance = {}, None
    for mtp in (False, True):
        run = run_litertlm(bundle, SPEED_PROMPTS, max_tokens=max_tokens, context=context, mtp=mtp, timeout=900)
        rate[mtp] = sum(run.decode_tokens_per_second) / len(run.decode_tokens_per_second)
        if mtp:
            acceptance = run.success_rate
    return {"engine_tokens_per_second_plain": rate[False], "engine_tokens_per_second_mtp": rate[True],
            "engine_speedup": rate[True] / rate[False], "engine_acceptance": acceptance}


def run_onnx(work: Path, recipes, context: int, max_tokens: int, threads: int) -> dict:
    from edge_mtp import demo
    from edge_mtp.export.onnx_requantize import quantize_onnx_bundle
    from edge_mtp.export.pipeline import export_onnx
    from edge_mtp.bundle.onnx_folder import read_manifest
    from edge_mtp.bundle import open_bundle
    from edge_mtp.runtime.backends.ort import OnnxBackend

    fp32 = work / "onnx-fp32"
    export_onnx(demo.target_dir(), demo.assistant_dir(), fp32, context=context, prefill=(16,), check=False)
    tokenizer = open_bundle(fp32).tokenizer
    rows = {}
    for recipe in recipes:
        bundle = fp32 if recipe == "fp32" else work / f"onnx-{recipe}"
        if recipe != "fp32":
            quantize_onnx_bundle(fp32, bundle, recipe)
        report = read_manifest(bundle).get("quantization_report")
        rows[recipe] = {"bytes": _bytes(bundle), "report": report,
                        **_speed(OnnxBackend(bundle, threads=threads), tokenizer, max_tokens)}
    return rows


def run_litert(work: Path, recipes, context: int, max_tokens: int, threads: int) -> dict:
    from edge_mtp import demo
    from edge_mtp.export.pipeline import export_litert
    from edge_mtp.runtime.api import load

    rows = {}
    for recipe in recipes:
        bundle = work / f"litert-{recipe}.litertlm"
        summary = export_litert(demo.target_dir(), demo.assistant_dir(), bundle, context=context, prefill=(16,),
                                check=False, quant=recipe)
        model = load(bundle)
        rows[recipe] = {"bytes": bundle.stat().st_size, "report": summary.quantization,
                        **_speed(model.backend, model.tokenizer, max_tokens),
                        **_engine_speed(bundle, context, max_tokens)}
    return rows


def table(results: dict) -> str:
    lines = ["| format | recipe | size (MiB) | × fp32 | logit rel. error | top-1 agreement | acceptance fp32 → quantized "
             "| MTP speed-up, our loop | run acceptance | MTP speed-up, LiteRT-LM | LiteRT-LM acceptance |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for fmt, rows in results.items():
        base = rows.get("fp32", {}).get("bytes")
        fp32_acc = next((r["report"]["drafter_acceptance_fp32"] for r in rows.values() if r["report"]), None)
        for recipe, row in rows.items():
            report = row["report"] or {"logit_relative_error": 0.0, "top1_agreement": 1.0,
                                       "drafter_acceptance_fp32": fp32_acc, "drafter_acceptance_quantized": fp32_acc}
            ratio = f"{row['bytes'] / base:.2f}" if base else "-"
            acc = (f"{report['drafter_acceptance_fp32']:.2f} → {report['drafter_acceptance_quantized']:.2f}"
                   if report["drafter_acceptance_fp32"] is not None else "-")
            name = recipe
            if report.get("components"):
                picks = {c["recipe"] for c in report["components"].values()}
                if recipe == "mixed":
                    name += " (" + ", ".join(f"{m.replace('per_layer_embedder', 'ple')}:{c['recipe']}"
                                             for m, c in report["components"].items()) + ")"
                elif picks != {recipe}:
                    name += f" ({'/'.join(sorted(picks))})"
            run_acc = f"{row['run_acceptance']:.2f}" if row["run_acceptance"] is not None else "-"
            engine = f"{row['engine_speedup']:.2f}×" if "engine_speedup" in row else "-"
            engine_acc = f"{row['engine_acceptance']:.2f}" if row.get("engine_acceptance") is not None else "-"
            lines.append(f"| {fmt} | {name} | {row['bytes'] / 2**20:.2f} | {ratio} | "
                         f"{report['logit_relative_error']:.4f} | {report['top1_agreement']:.3f} | {acc} | "
                         f"{row['speedup']:.2f}× | {run_acc} | {engine} | {engine_acc} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="onnx,litert")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    recipes = [r for r in args.recipes.split(",") if r]
    results = {}
    with tempfile.TemporaryDirectory(prefix="edge-mtp-quant-bench-") as tmp:
        for fmt in args.formats.split(","):
            run = {"onnx": run_onnx, "litert": run_litert}[fmt]
            results[fmt] = run(Path(tmp), recipes, args.context, args.max_tokens, args.threads)
            print(table({fmt: results[fmt]}), flush=True)  # each format as soon as it is measured
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    if len(results) > 1:
        print()
        print(table(results))


if __name__ == "__main__":
    main()
