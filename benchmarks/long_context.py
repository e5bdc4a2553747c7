"""Long context on a real-size .litertlm bundle: KV bytes, step costs by committed length, MTP at a set acceptance.

For each bundle: the bytes of its KV buffers (from its contract: ring-sized sliding caches, the KV dtype), and the
median ms of a decode, a verify (G+1 rows) and a drafter step with input_pos at each position, in our loop's LiteRT
backend on the CPU. A static graph computes over its whole buffers whatever the position, so the position moves only
which slots the mask shows; the caches hold zeros, which cost what any values cost. MTP/plain at acceptance A is the
cost model of `edge-mtp bench` on those measured costs: (1 + A + ... + A^G) / (G * draft + verify), in decodes.
The first bundle is the baseline of the ratios.

    .venv/bin/python -m benchmarks.long_context BASELINE.litertlm LONG.litertlm [--positions 1024,8192,30000]
        [--acceptance 0.8] [--rounds 15] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from edge_mtp.bench import expected_tokens
from edge_mtp.model.contract import DECODE, MASK_HIDDEN, MASK_VISIBLE, VERIFY, Contract
from edge_mtp.runtime.backends.litert import LiteRTBackend
from edge_mtp.runtime.speculative import SpeculativeDecoder


def kv_bytes(contract: Contract) -> int:
    """Bytes of every KV buffer the bundle's target declares (the drafter reads the same buffers)."""
    return sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in contract.kv_tensors())


def _median_ms(run, rounds: int) -> float:
    run()  # the first call of a signature pays for its set-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def step_costs(backend: LiteRTBackend, position: int, rounds: int) -> dict[str, float]:
    """Median ms of a decode, a verify and a drafter step at `position`."""
    decoder, contract = SpeculativeDecoder(backend), backend.contract
    token = 7
    out = {"decode": _median_ms(lambda: decoder.step(DECODE, [token], position), rounds),
           "verify": _median_ms(lambda: decoder.step(VERIFY, [token] * contract.verify_len, position), rounds)}
    if backend.has_drafter:
        hidden = contract.target.hidden_size
        activations = np.zeros((1, 1, 2 * hidden), np.float32)
        input_pos = np.full(1, position - 1, np.int32)
        mask = np.full((1, 1, 1, contract.context), MASK_HIDDEN, np.float32)
        mask[..., :position] = MASK_VISIBLE
        out["draft"] = _median_ms(lambda: backend.run_drafter(activations, input_pos, mask), rounds)
    return out


def measure(path: Path, positions: list[int], rounds: int, acceptance: float) -> dict:
    """KV bytes and step costs of one bundle at every position that fits its context."""
    backend = LiteRTBackend(path)
    c = backend.contract
    row = {"bundle": str(path), "context": c.context, "kv_dtype": c.kv_dtype, "ring": c.ring_size,
           "kv_bytes": kv_bytes(c), "positions": {}}
    for p in positions:
        if p + c.verify_len > c.context:
            continue
        costs = step_costs(backend, p, rounds)
        if "draft" in costs:
            g = c.draft_len
            per_round = g * costs["draft"] / costs["decode"] + costs["verify"] / costs["decode"]
            costs["mtp_over_plain"] = expected_tokens([], acceptance, g) / per_round
        row["positions"][p] = costs
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--positions", default="1024,8192,30000")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--acceptance", type=float, default=0.8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    positions = [int(p) for p in args.positions.split(",")]
    rows = [measure(b, positions, args.rounds, args.acceptance) for b in args.bundles]
    base = rows[0]
    print(f"{'bundle':40} {'context':>7} {'KV':>7} {'ring':>5} {'KV MiB':>8} {'pos':>6} {'decode ms':>9} "
          f"{'verify ms':>9} {'draft ms':>8} {'MTP/plain':>9} {'decode/base':>11}")
    for row in rows:
        for p, c in row["positions"].items():
            ratio = c["decode"] / base["positions"][p]["decode"] if p in base["positions"] else float("nan")
            print(f"{Path(row['bundle']).name:40} {row['context']:>7} {row['kv_dtype']:>7} {row['ring']:>5} "
                  f"{row['kv_bytes'] / 2**20:>8.1f} {p:>6} {c['decode']:>9.1f} {c['verify']:>9.1f} "
                  f"{c.get('draft', float('nan')):>8.2f} {c.get('mtp_over_plain', float('nan')):>9.2f} {ratio:>11.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
