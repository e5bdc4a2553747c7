"""Real-size export: synthesise a preset once (random weights, exact HF layout) and export it, printing peak memory
of the whole process tree, wall time, peak memory and peak extra disk use per stage (of the file system, so other
jobs writing to it count too) and the bundle's sections.

    python -m benchmarks.export_scale --preset e2b --quant int4 [--context 4096] [--format litert|onnx]

    python -m benchmarks.export_scale --run BUNDLE [--max-tokens 32]   # load and run a bundle (ONNX or LiteRT)
        as `edge-mtp run` does: resident memory after loading, plain and MTP tokens/s, MTP output == plain output

Not a test: E2B takes tens of minutes on 2 cores. The test suite runs the same streamed path on small presets.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from edge_mtp.checkpoint.spec import preset_pair
from edge_mtp.checkpoint.synth import write_drafter, write_target
from edge_mtp.util.atomic import interrupt_on_sigterm
from edge_mtp.util.cache import cache_root
from edge_mtp.util.memory import PeakMemory, PeakSampler, disk_used_bytes


def synthesised(preset: str, root: Path) -> Path:
    """The preset's random-weight pair under `root`, written on first use."""
    target, drafter = preset_pair(preset)
    out = root / preset
    if not (out / "target" / "config.json").is_file():
        write_target(out / "target", target, seed=0)
    if not (out / "assistant" / "config.json").is_file():
        write_drafter(out / "assistant", drafter, target, seed=1)
    return out


def run_bundle(bundle: Path, max_tokens: int) -> dict:
    """Open a bundle as `edge-mtp run` does (default threads) and generate greedily with MTP off, then on."""
    from edge_mtp.util.memory import tree_rss_bytes
    from edge_mtp.runtime.api import load

    before = tree_rss_bytes()
    start = time.time()
    with PeakMemory() as memory:
        model = load(bundle, verify=False)
        loaded = tree_rss_bytes() - before
        load_seconds = time.time() - start
        prompt = model.tokenizer.encode("The quick brown fox jumps over the lazy dog. Tell me a story about it.")
        prompt = prompt[:model.contract.context // 4]
        plain = list(model.generate(prompt, max_tokens=max_tokens, mtp=False))
        plain_stats = model.last_stats
        mtp = list(model.generate(prompt, max_tokens=max_tokens, mtp=True))
        mtp_stats = model.last_stats
    size = sum(p.stat().st_size for p in ([bundle] if bundle.is_file() else bundle.iterdir()))
    return {"bundle": str(bundle), "bundle_bytes": size, "load_seconds": load_seconds,
            "resident_after_load_bytes": loaded, "resident_over_bundle": loaded / size,
            "peak_rss_bytes": memory.peak - before, "plain_tokens_per_second": plain_stats.tokens_per_second,
            "mtp_tokens_per_second": mtp_stats.tokens_per_second, "mtp_equals_plain": mtp == plain,
            "tokens": len(plain), "drafted": mtp_stats.drafted, "accepted": mtp_stats.accepted}


def main() -> None:
    """Export one preset and print what it cost (or, with --run, run a bundle)."""
    from edge_mtp.export.pipeline import export_onnx
    from edge_mtp.export.pipeline import export_litert

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="e2b")
    parser.add_argument("--quant", default="int4")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--prefill", default="32,128")
    parser.add_argument("--format", choices=("litert", "onnx"), default="litert")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cache", type=Path,
                        default=cache_root() / "synth")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--run", type=Path, default=None, help="run this bundle instead of exporting")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    interrupt_on_sigterm()  # a stopped run leaves no temporary folder beside --out
    if args.run:
        result = run_bundle(args.run, args.max_tokens)
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return

    start = time.time()
    pair = synthesised(args.preset, args.cache)
    synth_seconds = time.time() - start
    out = args.out or Path(f"{args.preset}-{args.quant}" + (".litertlm" if args.format == "litert" else "-onnx"))
    export = export_litert if args.format == "litert" else export_onnx
    stages: list[tuple[str, float, float, float]] = []  # (stage, seconds, peak RSS GiB, peak extra disk GiB)
    current = ["loading checkpoints", time.time()]
    memory = PeakMemory()
    disk_before = disk_used_bytes(out.resolve().parent)
    disk = PeakSampler(lambda: disk_used_bytes(out.resolve().parent) - disk_before, interval=1.0)
    overall = overall_disk = 0

    def stage(text: str) -> None:
        nonlocal overall, overall_disk
        now = time.time()
        peak, disk_peak = memory.restart(), disk.restart()
        overall, overall_disk = max(overall, peak), max(overall_disk, disk_peak)
        stages.append((current[0], now - current[1], peak / 2**30, disk_peak / 2**30))
        current[:] = [text, now]
        print(f"[{now - start:7.1f} s] {text}", flush=True)

    def progress(what: str, done: int, total: int) -> None:
        print(f"[{time.time() - start:7.1f} s]   {done}/{total} {what}", flush=True)

    with memory, disk:
        summary = export(pair / "target", pair / "assistant", out, context=args.context,
                                prefill=tuple(int(x) for x in args.prefill.split(",")), quant=args.quant,
                                on_stage=stage, on_progress=progress)
        stage("done")
    overall, overall_disk = max(overall, memory.peak), max(overall_disk, disk.peak)
    report = summary.quantization or {}
    result = {
        "preset": args.preset, "format": args.format, "quant": args.quant, "context": args.context, "synth_seconds": synth_seconds,
        "export_seconds": summary.wall_seconds, "peak_rss_gib": overall / 2**30,
        "peak_extra_disk_gib": overall_disk / 2**30, "bundle_bytes": summary.bytes,
        "sections": summary.sections, "stage_seconds": stages,
        "logit_relative_error": report.get("logit_relative_error"), "top1_agreement": report.get("top1_agreement"),
        "drafter_top1_agreement": report.get("drafter_top1_agreement"),
    }
    print(f"\n{args.preset} {args.quant}: export {summary.wall_seconds / 60:.1f} min, peak RSS (process tree) "
          f"{overall / 2**30:.2f} GiB, peak extra disk {overall_disk / 2**30:.2f} GiB, bundle {summary.bytes / 2**30:.2f} GiB")
    for section in summary.sections:
        print(f"  {section['type']:<18} {section['model_type'] or '':<28} {section['bytes'] / 2**20:>10.1f} MiB")
    for text, seconds, peak, disk_peak in stages:
        print(f"  {seconds:8.1f} s  {peak:6.2f} GiB peak RSS  {disk_peak:6.2f} GiB peak extra disk  {text}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
