"""Fuzz every reader of untrusted bytes with Hypothesis (default 100k inputs each) and print what happened.

    python scripts/fuzz_readers.py [--examples 100000] [--only litertlm,config]

Contract per input (tests/fuzz_targets.py): only EdgeMtpError escapes, under a second, no write outside the
input's folder. A broken contract stops that reader with Hypothesis' shrunk counterexample.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hypothesis import HealthCheck, given, settings  # noqa: E402

from edge_mtp.util.errors import EdgeMtpError  # noqa: E402
from fuzz_targets import frozen_heap, run_guarded, targets  # noqa: E402


def fuzz(name: str, reader, strategy, examples: int) -> dict:
    """Run one reader on `examples` generated inputs; returns counts and timing."""
    outcomes: Counter = Counter()

    def counting(folder, value):
        try:
            reader(folder, value)
            outcomes["accepted"] += 1
        except EdgeMtpError:
            outcomes["EdgeMtpError"] += 1
            raise

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(value):
        run_guarded(counting, value)

    start = time.perf_counter()
    with frozen_heap():
        run()
    seconds = time.perf_counter() - start
    total = sum(outcomes.values())
    return {"reader": name, "inputs": total, "seconds": seconds, "rejected": outcomes["EdgeMtpError"],
            "accepted": outcomes["accepted"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    chosen = [n for n in targets() if not args.only or n in args.only.split(",")]
    print("| reader | inputs | rejected with EdgeMtpError | accepted | seconds | inputs/s |")
    print("|---|---|---|---|---|---|")
    for name in chosen:
        reader, strategy = targets()[name]
        r = fuzz(name, reader, strategy, args.examples)
        print(f"| {r['reader']} | {r['inputs']:,} | {r['rejected']:,} | {r['accepted']:,} | {r['seconds']:.0f} | "
              f"{r['inputs'] / r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
