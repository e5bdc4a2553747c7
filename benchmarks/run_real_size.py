"""Google's runtime on a real-size bundle: LiteRT-LM loads it and generates greedily with MTP on and off, and our
own loop must produce the same text. Prints LiteRT-LM's load time and the resident memory of its process.

    python -m benchmarks.run_real_size --bundle e2b-int4.litertlm [--max-tokens 32]

Not a test (minutes at real size); tests/test_litert.py checks the same equalities on small bundles.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from edge_mtp.util.memory import PeakMemory, tree_rss_bytes
from edge_mtp.util.prompts import DEFAULT_PROMPTS


def main() -> None:
    """Run LiteRT-LM (MTP off, then on) and our loop on one bundle; print tokens, equality, load time, memory."""
    import edge_mtp
    from edge_mtp.runtime.litertlm_engine import run_litertlm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=2, help="how many of the default prompts")
    args = parser.parse_args()
    prompts = DEFAULT_PROMPTS[:args.prompts]
    model = edge_mtp.load(args.bundle)
    context = model.backend.contract.context
    engine = {}
    for mtp in (False, True):
        base = tree_rss_bytes()
        with PeakMemory() as memory:
            engine[mtp] = run_litertlm(args.bundle, prompts, args.max_tokens, context, mtp=mtp, timeout=3600)
        print(f"LiteRT-LM MTP {'on ' if mtp else 'off'}: load {engine[mtp].load_seconds:.1f} s, process peak RSS "
              f"{(memory.peak - base) / 2**30:.2f} GiB, decode tok/s {engine[mtp].decode_tokens_per_second}, "
              f"success rate {engine[mtp].success_rate}")
    ours = {}
    for mtp in (False, True):
        start = time.time()
        ours[mtp] = [model.tokenizer.decode(list(model.generate(p, max_tokens=args.max_tokens, mtp=mtp)))
                     for p in prompts]
        print(f"our loop MTP {'on ' if mtp else 'off'}: {time.time() - start:.1f} s, {model.last_stats.drafted} drafted")
    for i, prompt in enumerate(prompts):
        off, on = engine[False].texts[i], engine[True].texts[i]
        print(f"\nprompt {prompt!r}\n  LiteRT-LM off: {off!r}\n  LiteRT-LM on:  {on!r}\n  ours off:      {ours[False][i]!r}"
              f"\n  ours on:       {ours[True][i]!r}")
        print(f"  LiteRT-LM on == off (up to off's length): {on.startswith(off)}; ours on == off: "
              f"{ours[True][i] == ours[False][i]}; ours == LiteRT-LM: {ours[False][i] == off}")


if __name__ == "__main__":
    main()
