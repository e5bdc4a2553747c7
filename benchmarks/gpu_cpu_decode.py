"""CPU cost of the GPU-delegable graph forms: the demo bundle's CPU decode tokens/s after vs before, in one run.

Give it the demo pair exported by the revision before the GPU work and by this one (same context and prefill), e.g.
`git stash`-free: `git worktree add /tmp/before <rev> && (cd /tmp/before && python -c "...export_litert(...)")`.
Google's LiteRT-LM decodes the default prompts on the CPU with MTP off and on; the bundles alternate, best of
three rounds each, and tokens and the drafter success rate must be identical.

    .venv/bin/python -m benchmarks.gpu_cpu_decode BEFORE.litertlm AFTER.litertlm [--context 256] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_mtp.runtime.litertlm_engine import run_litertlm
from edge_mtp.util.prompts import DEFAULT_PROMPTS


def main() -> None:
    """Print CPU decode tokens/s of both bundles with MTP off and on, and the after/before ratios."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    best, texts, rates = {}, {}, {}
    for _ in range(3):
        for mtp in (False, True):
            for name in ("before", "after"):
                run = run_litertlm(getattr(args, name), DEFAULT_PROMPTS, args.max_tokens, args.context, mtp=mtp)
                speed = sum(run.decode_tokens_per_second) / len(run.decode_tokens_per_second)
                best[name, mtp] = max(best.get((name, mtp), 0.0), speed)
                texts[name, mtp], rates[name, mtp] = run.texts, run.success_rate
    for mtp in (False, True):
        same = texts["before", mtp] == texts["after", mtp] and rates["before", mtp] == rates["after", mtp]
        print(f"MTP {'on ' if mtp else 'off'}: before {best['before', mtp]:.0f} tok/s, after {best['after', mtp]:.0f} "
              f"tok/s, ratio {best['after', mtp] / best['before', mtp]:.2f}x; tokens and success rate "
              f"{'identical' if same else 'DIFFER'} ({rates['after', mtp]})")


if __name__ == "__main__":
    main()
