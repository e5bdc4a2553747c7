"""Our Python loop against Google's LiteRT-LM on the demo bundle, and what each signature costs, in one run.

Prints (ratios are measured in this run, the compared variants interleaved, best of --rounds):
- per-signature ms for LiteRT and ONNX (embedder + per-layer embedder, decode, verify(G+1), one drafter step),
  called directly with the same inputs, and verify/decode, draft/decode;
- decode tokens/s of our loop (on LiteRT and on ONNX) and of LiteRT-LM (C++) at the same CPU thread count, plain and
  MTP, with the ratios ours / LiteRT-LM and MTP / plain;
- our loop's host time per token: its ms per token minus the graph time it called (what Python adds).

    .venv/bin/python -m benchmarks.loop_speed [--context 512] [--threads 2] [--max-tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edge_mtp.bundle import open_bundle
from edge_mtp.model.contract import DECODE, VERIFY, causal_mask, drafter_mask
from edge_mtp.runtime.backends.base import Backend
from edge_mtp.runtime.speculative import generate_tokens
from edge_mtp.util.prompts import DEFAULT_PROMPTS


def signature_ms(backend: Backend, calls: int = 200, position: int = 16,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median ms per direct call of each signature (the four interleaved, the same inputs every call).

    `clock` time.thread_time with a one-thread backend counts this thread's CPU time only: steady on a shared machine.
    """
    c = backend.contract
    emb, ple = backend.embed(1)
    n = c.verify_len
    rows = lambda a: None if a is None else np.repeat(a, n, axis=1)  # noqa: E731
    pos1, posn = np.array([position], np.int32), np.arange(position, position + n, dtype=np.int32)
    mask1, maskn = causal_mask(position, 1, c.context), causal_mask(position, n, c.context)
    act = np.zeros((1, 1, 2 * c.target.hidden_size), np.float32)
    dmask = drafter_mask(position - 1, c.context)
    calls_of: dict[str, Callable[[], object]] = {
        "embed": lambda: backend.embed(1),
        "decode": lambda: backend.run_target(DECODE, emb, ple, pos1, mask1),
        f"verify({n})": lambda: backend.run_target(VERIFY, rows(emb), rows(ple), posn, maskn),
        "draft step": lambda: backend.run_drafter(act, pos1 - 1, dmask)}
    times: dict[str, list[float]] = {k: [] for k in calls_of}
    for i in range(calls + 5):
        for name, call in calls_of.items():
            t = clock()
            call()
            if i >= 5:  # the first calls pay for lazy initialisation
                times[name].append((clock() - t) * 1000)
    return {k: float(np.median(v)) for k, v in times.items()}


def loop_tokens_per_second(backend: Backend, prompts: Sequence[Sequence[int]], max_tokens: int, mtp: bool) -> float:
    """Decode tokens/s of our loop over the prompts (first token excluded, as LiteRT-LM counts it)."""
    stats = [generate_tokens(backend, list(p), max_tokens=max_tokens, mtp=mtp)[1] for p in prompts]
    return sum(s.generated - 1 for s in stats) / sum(s.total_ms - s.time_to_first_token_ms for s in stats) * 1000


def litertlm_tokens_per_second(bundle: Path, prompts: Sequence[str], max_tokens: int, context: int, threads: int,
                               mtp: bool) -> float:
    """LiteRT-LM's own decode counters over the prompts (decoded tokens / decode seconds), CPU at `threads` threads.

    The engine is opened for this call only, so at most one engine and our backend hold the model at a time.
    """
    import litert_lm

    tokens = seconds = 0.0
    with tempfile.TemporaryDirectory() as cache:
        engine = litert_lm.Engine(str(bundle), backend=litert_lm.Backend.CPU(thread_count=threads),
                                  max_num_tokens=context, enable_speculative_decoding=mtp, enable_benchmark=True,
                                  cache_dir=cache)
        for prompt in prompts:
            session = engine.create_session(apply_prompt_template=False, max_output_tokens=max_tokens,
                                            enable_speculative_decoding=mtp)
            session.run_prefill([prompt])
            session.run_decode()
            info = session.get_benchmark_info()
            tokens += info.last_decode_token_count
            seconds += info.last_decode_token_count / info.last_decode_tokens_per_second
            session.close()
        engine.close()
    return tokens / seconds


def best_of(rounds: int, runs: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Each run's best value over `rounds`, the runs interleaved within every round so machine noise hits all alike."""
    best = {k: 0.0 for k in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            best[name] = max(best[name], run())
    return best


def compare_loops(bundle: Path, backend: Backend, prompts: Sequence[str], ids: Sequence[Sequence[int]],
                  max_tokens: int, threads: int, rounds: int, onnx: Backend | None = None) -> dict[str, float]:
    """Decode tokens/s of our loop (LiteRT, optionally ONNX) and LiteRT-LM, plain and MTP, interleaved."""
    context = backend.contract.context
    runs = {}
    for mtp, label in ((False, "plain"), (True, "MTP")):
        runs[f"LiteRT-LM {label}"] = lambda m=mtp: litertlm_tokens_per_second(bundle, prompts, max_tokens, context,
                                                                              threads, m)
        runs[f"ours/LiteRT {label}"] = lambda m=mtp: loop_tokens_per_second(backend, ids, max_tokens, m)
        if onnx is not None:
            runs[f"ours/ONNX {label}"] = lambda m=mtp: loop_tokens_per_second(onnx, ids, max_tokens, m)
    loop_tokens_per_second(backend, ids[:1], 8, True)  # warm-up
    return best_of(rounds, runs)


def print_costs(costs: dict[str, dict[str, float]]) -> None:
    """One row per format: ms per signature, verify/decode and draft/decode."""
    names = list(next(iter(costs.values())))
    verify = next(n for n in names if n.startswith("verify"))
    print("format   " + "".join(f"{n:>12}" for n in names) + "  verify/decode  draft/decode   (ms per call)")
    for fmt, ms in costs.items():
        print(f"{fmt:8} " + "".join(f"{ms[n]:12.3f}" for n in names)
              + f"  {ms[verify] / ms['decode']:13.2f}  {ms['draft step'] / ms['decode']:12.2f}")


def print_loops(speed: dict[str, float]) -> None:
    """tokens/s per runtime, and the ratios ours / LiteRT-LM and MTP / plain."""
    for label in ("plain", "MTP"):
        lm = speed[f"LiteRT-LM {label}"]
        for ours in ("ours/LiteRT", "ours/ONNX"):
            if f"{ours} {label}" in speed:
                print(f"{label:5} {ours:11} {speed[f'{ours} {label}']:7.0f} tok/s = "
                      f"{speed[f'{ours} {label}'] / lm:.2f}x LiteRT-LM ({lm:.0f} tok/s)")
    for runtime in ("LiteRT-LM", "ours/LiteRT", "ours/ONNX"):
        if f"{runtime} MTP" in speed:
            print(f"MTP/plain {runtime:11} {speed[f'{runtime} MTP'] / speed[f'{runtime} plain']:.2f}x")


def main() -> None:
    """Signature costs and loop speeds, ours vs LiteRT-LM, on the demo pair (exported unless bundles are given)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="a demo .litertlm (default: export one at --context)")
    parser.add_argument("--onnx", type=Path, help="the same pair as an ONNX bundle folder (default: export one)")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200, help="direct calls per signature")
    args = parser.parse_args()

    from edge_mtp.demo import assistant_dir, target_dir
    from edge_mtp.runtime.backends.litert import LiteRTBackend
    from edge_mtp.runtime.backends.ort import OnnxBackend

    with tempfile.TemporaryDirectory() as tmp:
        bundle, folder = args.bundle or Path(tmp) / "demo.litertlm", args.onnx or Path(tmp) / "demo-onnx"
        if args.bundle is None:
            from edge_mtp.export.pipeline import export_litert

            export_litert(target_dir(), assistant_dir(), bundle, context=args.context, prefill=(32, 128))
        if args.onnx is None:
            from edge_mtp.export.pipeline import export_onnx

            export_onnx(target_dir(), assistant_dir(), folder, context=args.context, prefill=(32, 128))
        tokenizer = open_bundle(bundle).tokenizer
        litert, onnx = LiteRTBackend(bundle, threads=args.threads), OnnxBackend(folder, threads=args.threads)
        ids = [tokenizer.encode(p) for p in DEFAULT_PROMPTS]
        print(f"{bundle.name} + {folder.name}, context {litert.contract.context}, {args.threads} CPU thread(s), "
              f"{args.max_tokens} tokens per prompt")
        costs = {"LiteRT": signature_ms(litert, args.calls), "ONNX": signature_ms(onnx, args.calls)}
        print_costs(costs)
        speed = compare_loops(bundle, litert, DEFAULT_PROMPTS, ids, args.max_tokens, args.threads, args.rounds, onnx)
        print_loops(speed)
        for fmt, backend in (("LiteRT", "ours/LiteRT"), ("ONNX", "ours/ONNX")):
            graph = costs[fmt]["decode"] + costs[fmt]["embed"]
            print(f"host time per plain token, {fmt}: {1000 / speed[f'{backend} plain'] - graph:.3f} ms "
                  f"(loop {1000 / speed[f'{backend} plain']:.3f} ms - graphs {graph:.3f} ms)")


if __name__ == "__main__":
    main()
